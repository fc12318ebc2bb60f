"""The method's post-processing stages, in pipeline order (method.md §2.9-2.20):
`threshold` (global threshold, shell criterion) -> `localize` (labelling, adaptive local thresholding,
discarding) -> `refine` (sphere fit per vesicle) -> `outliers` (Mahalanobis statistics) -> `overlaps`
(overlap shrinking, minimum radius, final label volume). `cryoves.engine.pipeline` runs them in order."""
