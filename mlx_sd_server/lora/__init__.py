"""LoRAs: their files in every layout people share them in (formats.py), the LoRA folder a request names them
from (library.py), and a LoRA bound to a loaded model's layers (bind.py). The pipeline puts bound LoRAs on the
model for one job through engine/adapters.py, which knows nothing of files; what is a family's (its name
maps, how to tell its LoRAs) is in its folder's lora.py.
"""
