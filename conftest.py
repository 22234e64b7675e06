# Lets tests import the top-level scripts and modules (data.py, augment.py, dcgan.py, ...)
# whatever directory pytest is started from.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
