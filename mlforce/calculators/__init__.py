"""ASE calculators: the reference (``reference``) and the machine-learned force field (``ml``).

Submodules are imported explicitly (``from mlforce.calculators.reference import ...``) so that
importing one does not pay for the other's dependencies.
"""
