"""Running a matrix: models provisioned (`provision`), cells built as values and run as
pure functions (`cells`, with the PGD cross-check of `attacks` and the probes of
`measure`), scheduled by executors (`executors`: worker processes; `ray_executor`: a Ray
cluster), orchestrated by `runner`, whose rows the driver alone writes to the store.
`paradox` writes the paradox study's extra tables next to a run's results."""
