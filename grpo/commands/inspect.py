"""`grpo inspect RUN_DIR`: a run's essentials in the terminal (over ssh, where the notebook is not at hand)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from grpo.commands.view import (
    RunError,
    conversation,
    group_summary,
    group_table,
    load_run,
    pass_at_k_table,
    summary,
)


def _short(text: str, n: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def inspect_run(path: str, step: int | None = None, prompt: str | None = None, top: int = 3,
                console: Console | None = None) -> int:
    console = console or Console()
    try:
        run = load_run(path)
        info = summary(run)
        t = Table(title=f"run {path}", show_header=False)
        for k, v in info.items():
            t.add_row(k, str(v))
        console.print(t)
        if run.rollouts.empty:
            return 0
        groups = group_summary(run, step)
        s = int(groups["step"].iloc[0])
        if prompt is not None:
            _print_group(console, run, s, prompt)
            _print_conversations(console, run, s, prompt)
            return 0
        for title, part in (("worst", groups.head(top)), ("best", groups.tail(top).iloc[::-1])):
            for _, g in part.iterrows():
                _print_group(console, run, s, g["prompt_id"], f"{title} group at step {s}")
        pk = pass_at_k_table(run.evals)
        if not pk.empty:
            t = Table(title="eval pass@k")
            for c in ("step", "k", "pass@k"):
                t.add_column(c)
            for _, r in pk.iterrows():
                t.add_row(str(int(r["step"])), str(int(r["k"])), f"{r['pass@k']:.3f}")
            console.print(t)
    except RunError as e:
        console.print(f"[red]grpo inspect: {e}[/red]")
        return 2
    return 0


def _print_group(console: Console, run, step: int, prompt_id: str, title: str | None = None) -> None:
    df = group_table(run, step, prompt_id)
    row = run.rollouts[(run.rollouts["step"] == step) & (run.rollouts["prompt_id"] == prompt_id)].iloc[0]
    t = Table(title=f"{title or 'group'}: {prompt_id}  (answer: {row.get('answer', '')})",
              caption=_short(row["prompt"], 160))
    for c in df.columns:
        t.add_column(c.replace("reward/", "r:"), overflow="fold")
    for _, r in df.iterrows():
        t.add_row(*[_short(v) if isinstance(v, str) else (f"{v:.3f}" if isinstance(v, float) else str(v))
                    for v in r.values])
    console.print(t)


def _print_conversations(console: Console, run, step: int, prompt_id: str) -> None:
    """Each completion of the group that called a tool, turn by turn."""
    df = group_table(run, step, prompt_id)
    for i in df[df["tool_calls"] > 0]["sample_index"] if "tool_calls" in df else []:
        turns = conversation(run, step, prompt_id, int(i))
        t = Table(title=f"completion {int(i)}, turn by turn")
        for c in turns.columns:
            t.add_column(c, overflow="fold")
        for _, r in turns.iterrows():
            t.add_row(*["" if v is None or v != v else _short(v) if isinstance(v, str) else
                        (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in r.values])
        console.print(t)
