"""mlforce: active learning of machine-learned molecular force fields.

A PaiNN-style graph neural network trained with node-feature dropout and DropEdge; Monte Carlo
dropout at run time gives a per-atom force uncertainty that decides when a reference
calculation (GFN2-xTB, DFT, any ASE calculator) is needed.
"""

__version__ = "0.1.0"
