"""Building blocks of the network: radial basis, dropout, interaction blocks, readout."""
