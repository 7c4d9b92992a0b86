import sys
from pathlib import Path

# Tests import minflow, toy and sd35 from the repository root, as the scripts do.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
