"""Ray Train LoRA finetuning jobs: `python -m raymoe.finetune --config job.yaml`."""
