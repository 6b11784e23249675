"""The stages, one module each: pretrain, linear_probe, finetune; their shared scaffolding in common.

    from crate_mae.stages.pretrain import run_pretrain      # pretrain.py
    from crate_mae.stages.linear_probe import run_linprobe  # linprobe.py
    from crate_mae.stages.finetune import run_finetune      # finetune.py
"""
