# Lets the tests import the model scripts (dcgan.py, ...), the shared package (ganlab/) and the
# measuring tools (tools/modes.py, ...) whatever directory pytest is started from, installed or not.
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
