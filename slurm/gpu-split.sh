#!/bin/bash
# Sourced by slurm/multinode.slurm: which GPUs the trainer and each vLLM server get.
#   grpo_gpu_split GPUS NODES NPROC_WANTED SERVERS_WANTED VISIBLE
# GPUS: GPUs per node (0 on CPU); NODES: nodes in the job; *_WANTED: GRPO_NPROC / GRPO_SERVERS_PER_NODE or empty;
# VISIBLE: the CUDA_VISIBLE_DEVICES slurm gave the job (the node's GPU ids, not necessarily 0..GPUS-1).
# Sets NPROC, PER_NODE, TRAIN_GPUS (comma list for the trainer's CUDA_VISIBLE_DEVICES; empty on CPU) and
# SERVER_GPUS (one id per server). One node holds both roles: by default half its GPUs train and half generate.
# Returns 2 with a message when the split does not fit.
grpo_gpu_split() {
  local gpus=$1 nodes=$2 nproc=$3 per=$4 visible=$5
  local -a ids
  if [ "$gpus" -eq 0 ]; then
    NPROC=${nproc:-1}; PER_NODE=${per:-1}; TRAIN_GPUS=""; SERVER_GPUS=()
    return 0
  fi
  if [ -n "$visible" ]; then IFS=, read -r -a ids <<< "$visible"; else mapfile -t ids < <(seq 0 $(( gpus - 1 ))); fi
  if [ "${#ids[@]}" -lt "$gpus" ]; then
    echo "grpo: CUDA_VISIBLE_DEVICES=$visible names ${#ids[@]} GPU(s), fewer than the node's $gpus" >&2; return 2
  fi
  if [ "$nodes" -eq 1 ]; then
    if [ -z "$per" ] && [ -n "$nproc" ]; then per=$(( gpus - nproc )); fi  # one given: the other takes the rest
    per=${per:-$(( gpus / 2 ))}
    nproc=${nproc:-$(( gpus - per ))}
    if [ "$per" -lt 1 ] || [ "$nproc" -lt 1 ] || [ $(( nproc + per )) -gt "$gpus" ]; then
      echo "grpo: one node with $gpus GPU(s) cannot hold $nproc training process(es) and $per vLLM server(s)" \
           "(each needs its own GPU; set GRPO_NPROC and GRPO_SERVERS_PER_NODE, or use more nodes)" >&2
      return 2
    fi
    SERVER_GPUS=("${ids[@]:nproc:per}")
  else
    per=${per:-$gpus}
    nproc=${nproc:-$gpus}
    if [ "$per" -lt 1 ] || [ "$nproc" -lt 1 ] || [ "$per" -gt "$gpus" ] || [ "$nproc" -gt "$gpus" ]; then
      echo "grpo: $nproc training process(es) or $per vLLM server(s) per node do not fit $gpus GPU(s) a node" >&2
      return 2
    fi
    SERVER_GPUS=("${ids[@]:0:per}")
  fi
  TRAIN_GPUS=$(IFS=,; echo "${ids[*]:0:nproc}")
  NPROC=$nproc; PER_NODE=$per
}
