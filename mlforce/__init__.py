"""mlforce: active learning of machine-learned molecular force fields.

A PaiNN-style graph neural network trained with node-feature dropout and DropEdge; Monte Carlo
dropout at run time gives a per-atom force uncertainty that decides when a reference
calculation (GFN2-xTB, DFT, any ASE calculator) is needed.
"""

import os

__version__ = "0.1.0"

# PyTorch's CPU allocator puts buffers of >= 2 MB on transparent huge pages when this is set
# before torch's first allocation (read once). Without it every large (E, 3F) edge tensor is a
# fresh mmap paid for page by page: a 10 368-atom water box took 22.6 s per energy + forces
# call instead of 8.8 s, and time per edge grew 3x with size (docs/benchmarks.md 14). No
# effect when torch was imported first; `THP_MEM_ALLOC_ENABLE=0` in the environment opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
