"""Names of graph fields and result keys, with shapes and units.

n: atoms in a batch, E: directed edges, B: graphs (structures), T: MC samples.
"""

# --- graph fields (torch_geometric Data / Batch attributes) -------------------------------
POSITIONS = "pos"  # (n, 3) float, Å
SPECIES = "species"  # (n,) long, index into the model's species list (not the atomic number)
NUMBERS = "numbers"  # (n,) long, atomic numbers
LOCAL_ATOM = "local_atom"  # (n,) long, atom index inside its own structure (0..n_g-1)
EDGE_INDEX = "edge_index"  # (2, E) long, row 0 = source j, row 1 = target i (message j -> i)
CELL_SHIFT = "cell_shift"  # (E, 3) float, integer cell shifts S: r_ij = r_j - r_i + S @ cell
CELL = "cell"  # (B, 3, 3) float, Å, rows are lattice vectors (zeros for molecules)
PBC = "pbc"  # (B, 3) bool
BATCH = "batch"  # (n,) long, graph index of each atom
ENERGY_REF = "energy_ref"  # (B,) float, eV, reference energy (training data only)
FORCES_REF = "forces_ref"  # (n, 3) float, eV/Å, reference forces (training data only)

# --- result keys (ASE calculator results and model outputs) -------------------------------
ENERGY = "energy"  # (B,) eV
FORCES = "forces"  # (n, 3) eV/Å, deterministic model (or MC mean, or one sample, if configured)
POINT_FORCES = "point_forces"  # (n, 3) eV/Å, the model's own prediction when a sample drives MD
STRESS = "stress"  # (B, 3, 3) eV/Å^3, ASE sign convention: (1/V) dE/d(strain)
ENERGY_STD = "energy_std"  # (B,) eV, std over MC samples
FORCES_STD = "forces_std"  # (n,) eV/Å, per atom: norm of the 3-component std over samples
MAX_FORCE_STD = "max_force_std"  # (B,) eV/Å, max over atoms of forces_std (calibrated)
ENERGY_SAMPLES = "energy_samples"  # (T, B) eV
FORCES_SAMPLES = "forces_samples"  # (T, n, 3) eV/Å

# --- label ledger ---------------------------------------------------------------------------
# why a structure was labelled (the ledger's ``trigger``); ``top_up``: a round filled from the
# visited frames while the campaign was quiet but failed its accuracy check
TRIGGERS = ("seed", "uncertainty", "random", "audit", "guard", "manual", "top_up")
