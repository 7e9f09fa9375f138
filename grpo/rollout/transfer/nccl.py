"""vLLM's own `nccl` weight transfer between GPUs (packed broadcast, layerwise reload): nothing of ours runs in it but
the init info, so that the GPU path is the code vLLM tests on GPUs."""

from __future__ import annotations


def trainer_init_info(host: str, port: int, world_size: int, rank: int, bucket_bytes: int):
    """vLLM's NCCL trainer init info: the sender is rank 0 of `world_size` (itself plus every server worker)."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    return NCCLTrainerInitInfo(master_address=host, master_port=port, world_size=world_size, rank=rank, packed=True,
                               packed_buffer_size_bytes=bucket_bytes)
