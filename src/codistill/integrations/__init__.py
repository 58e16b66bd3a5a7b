"""Codistillation inside training frameworks (optional extras): ``codistill.integrations.hf``
(Hugging Face Trainer; ``pip install 'codistill[hf]'``) and ``codistill.integrations.lightning``
(PyTorch Lightning; ``pip install 'codistill[lightning]'``). Accelerate needs no integration:
see docs/integrations.md."""
