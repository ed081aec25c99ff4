"""Synthetic JUMP-layout buckets (`dinocell synth`): a seeded image model of Cell Painting fields and a writer that
lays them out exactly like cpg0000-jump-pilot/source_4, faults included.

Modules: bucket (`synth_bucket`, the run, and `SynthReport`), plan (names, phenotypes, wells and treatments from the
seed), images (rendering and writing the TIFFs, illumination functions), csvs (load_data CSVs, plate maps), faults
(`SynthFaults`, planting them), cells (the image model).
"""

from dinocell.synth.bucket import SynthReport, synth_bucket
from dinocell.synth.faults import SynthFaults

__all__ = ["SynthFaults", "SynthReport", "synth_bucket"]
