"""Train Higgs Audio v2 with DeepSpeed ZeRO from higgs-ds shards.

    deepspeed --num_gpus N --master_port PORT launch/train.py --config run.yaml [section.key=value ...]
    torchrun --nproc_per_node N --master_port PORT launch/train.py --config run.yaml ...
    python launch/train.py --config run.yaml --dry-run      # resolved config, data plan, memory estimate
"""
import sys


def run() -> int:
    # Imported here, not at the top: every DataLoader worker re-imports this script (they start from a
    # forkserver, higgs_ds.data.stream.worker_context), and should not import the trainer's modules to do so.
    from higgs_ds.train import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
