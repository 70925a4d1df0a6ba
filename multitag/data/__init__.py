"""Datasets and their contracts: what training may read, checked before it reads it.

Modules, one job each (import the one you need: `from multitag.data import contracts`):
`contracts` and its `contract_*` parts check train.csv and its images against
data_contracts/training_labels.yaml; `datasets` fetches datasets with `untar_data`, through
`archives` (the safety check), `extraction` and `cache`; `packing` packs a folder as fastai
packs its datasets; `shapes` generates the offline demo dataset. Nothing is imported here.
"""
