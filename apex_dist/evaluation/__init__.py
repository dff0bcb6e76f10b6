"""Evaluation of generated images at real scale: GenEval-style scores and CLIP score.

- `prompts`: the six GenEval tasks' prompt set, generated from the COCO classes (fixed seed).
- `rules`: GenEval's thresholds and scoring rules on detections (pure functions).
- `detector`, `clip`: Mask2Former (COCO instances) and CLIP from local snapshot folders.
- `evaluator`: images + prompts -> verdicts and CLIP scores; summaries; JSON and Markdown.
- `images`: the folder format of generated images and the generate-then-score driver.
- `training`: the periodic evaluation of the student during training (logging.eval_every_steps).

`tools/eval.py` (`apex-eval`) is the command line; docs/evaluation.md the guide. The synthetic
dataset keeps its exact evaluator (`apex_dist.data.evaluate`).
"""
