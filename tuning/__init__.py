"""Fine-tuning: dialogue corpora -> masked token datasets (data.py, prepare.py) for the RWKV-5 trainer."""
