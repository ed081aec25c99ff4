"""The pipeline's plumbing around the step entries: where a run writes (layout), what artifacts carry (pointers),
running it here (local: kfp.local; in_process: no KFP), submitting it (submit), the demo, and what a run left
(outcome). The pipeline definition itself is the repository's pipeline.py."""
