"""Training infrastructure the loop (mrgfast/train.py) imports, one concern per module.

config (+config_parse): run config from YAML and key=value overrides; checkpoint (+state_io): atomic, exact
checkpoints; optim + schedule: fused AdamW with a tensor LR and warmup+cosine; guards: NaN/inf loss and SIGTERM;
telemetry (+metrics_log, throughput, progress, gpu_monitor): logs, tokens/s, MFU, GPU samples; distributed:
torchrun groups, DDP / FSDP2; fsdp: FSDP2 that shards the frozen base (the trainables too with shard_trainable);
build: config -> data, tokenizer, model, optimizer; steps: the SFT / DPO step; cuda_graph: capture and replay of
the step on CUDA (eager twin on CPU).
"""
