"""The offline half of PromptIntern: progressive LoRA fine-tuning that internalises a registered prompt.

Entry points: `trainer.train.train_prompt` (the job runner's API), `trainer.cli` (`promptintern train`),
`trainer.nl2bash` (the worked example). Importing the package loads no model and no torch.
"""
