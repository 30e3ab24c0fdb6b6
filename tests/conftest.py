import os
import sys

# the stages are plain scripts in the repository root, imported by the tests as modules
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
