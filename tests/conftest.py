import sys
from pathlib import Path

# Tests import their shared builders (tiny_diffusers, parity) as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
