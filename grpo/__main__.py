from grpo.commands.cli import main

raise SystemExit(main())
