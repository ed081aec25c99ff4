"""Synthetic JUMP-layout buckets (`dinocell synth`): a seeded image model of Cell Painting fields and a writer that
lays them out exactly like cpg0000-jump-pilot/source_4, faults included.

Modules: bucket (`synth_bucket`, the run, and `SynthReport`), plan (names, phenotypes, wells and the plate map from
the seed), perturbations (the planted layout: DMSO / positive controls / replicated treatments sharing targets, their
effects), nuisance (batch, plate and well-position effects), seeds (the seed streams), images (rendering and writing
the TIFFs, illumination functions), csvs (load_data CSVs), platemaps (plate maps and perturbation metadata), faults
(`SynthFaults`, planting them), cells (the image model).
"""

from dinocell.synth.bucket import SynthReport, synth_bucket
from dinocell.synth.faults import SynthFaults

__all__ = ["SynthFaults", "SynthReport", "synth_bucket"]
