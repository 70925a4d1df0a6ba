"""Training a model, choosing its thresholds, and the report that travels with it.

Modules, one job each (import the one you need: `from multitag.training import learner`):
- `training_table`: train.csv as the table training needs; TrainingError.
- `learner`: the fastai DataBlock and learner, training, predicting, export and load
  (imports fastai, so only training and unpickling paths import it).
- `models`: what an exported learner refers to when unpickled (builders, the mAP metric).
- `thresholds`: the public face of threshold selection and evaluation, re-exporting
  `score_groups`, `threshold_selection`, `threshold_set` and `evaluation`.
- `reports` and `report_plots`: the model's report.md and its PNG plots.
- `retraining`: the retrain steps over a staging folder, as the flow's tasks call them.

Nothing is imported here, so `import multitag.training.thresholds` never loads fastai.
"""
