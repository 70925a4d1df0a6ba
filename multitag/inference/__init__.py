"""From image bytes to scores: decoding, image sources, scorers, the fast path, the Tagger.

Modules, one job each (import the one you need: `from multitag.inference import tagger`):
`imaging` decodes; `sources` lists, `reading` reads and `faults` says what a failed read
means; `scorers`, `torch_scorer`, `aoti` and
`onnx_export` are the scoring back-ends; `measure`, `agreement`, `records` and `selection`
check and choose the fast path; `loading` turns a registry version into a `tagger.Tagger`,
choosing the scorer first. Nothing is imported here, so importing a light module stays light.
"""
