"""The offline half of PromptIntern: progressive LoRA fine-tuning that internalises a registered prompt.

Entry points: `trainer.jobspec` (the gateway's one boundary: a job spec in, an adapter folder and its
manifest out), `trainer.train.train_prompt` (in-process training), `trainer.cli` (`promptintern train`),
`trainer.nl2bash` (the worked example). Importing the package loads no model and no torch.
"""
