"""The GenEval-style prompt set: six tasks written from the 80 COCO classes, colours, counts and
relations, with the metadata that says what a correct image shows.

GenEval (Ghosh, Hajishirzi and Schmidt, NeurIPS 2023 Datasets and Benchmarks; its public
`prompts/create_prompts.py`) defines six tasks, each one template:

    single_object  "a photo of a {object}"                         every COCO class once
    two_object     "a photo of a {object} and a {object}"          two different classes
    counting       "a photo of {2..4} {objects}"                   and not one more
    colors         "a photo of a {colour} {object}"                never a coloured person
    position       "a photo of a {object} {relation} a {object}"   left of, right of, above, below
    color_attr     "a photo of a {colour} {object} and a {colour} {object}"
                                                                   two classes, two colours

Each prompt comes with its metadata in GenEval's JSON layout, so that a prompt file of GenEval
itself can be scored by this package as well:

    {"tag": "counting", "prompt": "a photo of three cups",
     "include": [{"class": "cup", "count": 3}], "exclude": [{"class": "cup", "count": 4}]}

`include` clauses must all hold (at least `count` detections of `class`, of `color` when given,
and at `position` = [relation, index of an earlier clause] relative to that clause's objects);
`exclude` clauses must all fail (fewer than `count` detections). The scoring is in `rules.py`.

The set here is generated, not copied: a fixed seed and a count per task give the same prompts on
every machine (numpy's PCG64 stream, one per task, so that changing one task's count leaves the
others unchanged), drawn without repeats. Plurals are written as English has them ("three
knives", "two people", "four sheep"), where GenEval appends "s"/"es"; the scoring is unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy

# The 80 COCO object classes (Lin et al. 2014, "Microsoft COCO", the instance annotations'
# category names) in COCO's order, as GenEval names them: COCO's "mouse", "remote" and
# "keyboard" are "computer mouse", "tv remote" and "computer keyboard" in its prompts.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# Detector label names (COCO's own spelling, as in the id2label of transformers' COCO
# checkpoints) that GenEval writes differently.
COCO_LABEL_ALIASES = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
}
# GenEval's ten colours (its create_prompts.py and evaluate_images.py use the same list).
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# GenEval's four relations; "left of" means the first object is left of the second.
RELATIONS = ("left of", "right of", "above", "below")
# Counts of the counting task: GenEval draws 2 to its max_count of 4.
COUNT_RANGE = (2, 4)
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
# The class that never gets a colour (GenEval: no "[colour] person" prompts).
NO_COLOUR_CLASS = "person"
# The six tasks in GenEval's order, with its tag names.
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# GenEval's defaults: seed 43 and 100 prompts per task (single_object has one per class, 80).
DEFAULT_SEED = 43
DEFAULT_PER_TASK = 100
# Plurals that are not the class name plus "s" (GenEval appends "s", or "es" after an "s").
IRREGULAR_PLURALS = {
    "person": "people",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "knife": "knives",
    "computer mouse": "computer mice",
    "bus": "buses",
    "wine glass": "wine glasses",
    "bench": "benches",
    "sandwich": "sandwiches",
    "couch": "couches",
    "toothbrush": "toothbrushes",
    "sports ball": "sports balls",
}


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and what a correct image of it shows (GenEval's metadata layout).

    tag: the task (one of TASKS).
    prompt: the text given to the generator.
    include: clauses that must hold: {"class", "count"} plus optionally "color" and
        "position": [relation, index of an earlier include clause].
    exclude: clauses that must not hold: {"class", "count"} (fewer than count detections).
    """

    tag: str
    prompt: str
    include: tuple[dict, ...]
    exclude: tuple[dict, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "tag": self.tag,
            "prompt": self.prompt,
            "include": [dict(clause) for clause in self.include],
        }
        if self.exclude:
            value["exclude"] = [dict(clause) for clause in self.exclude]
        return value

    @classmethod
    def from_json(cls, value: Any, where: str) -> PromptSpec:
        """A spec from its JSON form; `where` names the file and line in errors."""
        problems = spec_problems(value)
        if problems:
            raise ValueError(
                f"{where}: not a prompt's evaluation metadata ({'; '.join(problems)}); the "
                'layout is {"tag": ..., "prompt": ..., "include": [{"class": ..., "count": ...}]}'
                " (docs/evaluation.md)"
            )
        include = tuple(_clause(clause) for clause in value["include"])
        exclude = tuple(_clause(clause) for clause in value.get("exclude", []))
        return cls(value["tag"], value["prompt"], include, exclude)

    def key(self) -> str:
        """A canonical text of the spec (two prompts with equal keys are the same prompt)."""
        return json.dumps(self.to_json(), sort_keys=True)


def _clause(clause: dict) -> dict:
    result = {"class": clause["class"], "count": int(clause["count"])}
    if "color" in clause:
        result["color"] = clause["color"]
    if "position" in clause:
        relation, group = clause["position"]
        result["position"] = [relation, int(group)]
    return result


def spec_problems(value: Any) -> list[str]:
    """What is wrong with a prompt's JSON metadata (empty when it can be scored)."""
    if not isinstance(value, dict):
        return [f"expected an object, got {type(value).__name__}"]
    problems = []
    if value.get("tag") not in TASKS:
        problems.append(f"tag {value.get('tag')!r} is not one of {list(TASKS)}")
    if not isinstance(value.get("prompt"), str) or not value.get("prompt"):
        problems.append("prompt must be a non-empty string")
    include = value.get("include")
    if not isinstance(include, list) or not include:
        problems.append("include must be a non-empty list of clauses")
        include = []
    exclude = value.get("exclude", [])
    if not isinstance(exclude, list):
        problems.append("exclude must be a list of clauses")
        exclude = []
    for kind, clauses in (("include", include), ("exclude", exclude)):
        for index, clause in enumerate(clauses):
            name = f"{kind}[{index}]"
            if not isinstance(clause, dict):
                problems.append(f"{name} must be an object")
                continue
            if clause.get("class") not in COCO_CLASSES:
                problems.append(f"{name}.class {clause.get('class')!r} is not a COCO class name")
            count = clause.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                problems.append(f"{name}.count must be an integer >= 1 (got {count!r})")
            if "color" in clause and clause["color"] not in COLOURS:
                problems.append(f"{name}.color {clause['color']!r} is not one of {list(COLOURS)}")
            if "position" in clause:
                position = clause["position"]
                valid = (
                    kind == "include"
                    and isinstance(position, (list, tuple))
                    and len(position) == 2
                    and position[0] in RELATIONS
                    and isinstance(position[1], int)
                    and 0 <= position[1] < index
                )
                if not valid:
                    problems.append(
                        f"{name}.position must be [relation, index of an earlier include clause] "
                        f"with a relation in {list(RELATIONS)} (got {position!r})"
                    )
    return problems


# ---- English ---------------------------------------------------------------------------------


def with_article(words: str) -> str:
    """'a cup', 'an apple' (GenEval's rule: "an" before a vowel letter)."""
    return f"an {words}" if words[0] in "aeiou" else f"a {words}"


def plural(name: str) -> str:
    if name in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[name]
    return f"{name}es" if name.endswith(("s", "sh", "ch", "x")) else f"{name}s"


# ---- the six templates -----------------------------------------------------------------------


def single_object(name: str) -> PromptSpec:
    return PromptSpec(
        "single_object", f"a photo of {with_article(name)}", ({"class": name, "count": 1},)
    )


def two_object(first: str, second: str) -> PromptSpec:
    return PromptSpec(
        "two_object",
        f"a photo of {with_article(first)} and {with_article(second)}",
        ({"class": first, "count": 1}, {"class": second, "count": 1}),
    )


def counting(name: str, count: int) -> PromptSpec:
    return PromptSpec(
        "counting",
        f"a photo of {COUNT_WORDS[count]} {plural(name)}",
        ({"class": name, "count": count},),
        ({"class": name, "count": count + 1},),
    )


def colour(name: str, colour_name: str) -> PromptSpec:
    return PromptSpec(
        "colors",
        f"a photo of {with_article(colour_name)} {name}",
        ({"class": name, "count": 1, "color": colour_name},),
    )


def position(first: str, relation: str, second: str) -> PromptSpec:
    """`first` at `relation` to `second`: the second object is clause 0, the first clause 1."""
    return PromptSpec(
        "position",
        f"a photo of {with_article(first)} {relation} {with_article(second)}",
        ({"class": second, "count": 1}, {"class": first, "count": 1, "position": [relation, 0]}),
    )


def colour_attribution(first: str, first_colour: str, second: str, second_colour: str):
    return PromptSpec(
        "color_attr",
        f"a photo of {with_article(first_colour)} {first} and "
        f"{with_article(second_colour)} {second}",
        (
            {"class": first, "count": 1, "color": first_colour},
            {"class": second, "count": 1, "color": second_colour},
        ),
    )


def _draw(task: str, rng: numpy.random.Generator) -> PromptSpec:
    """One random prompt of `task`."""
    classes = len(COCO_CLASSES)
    colourable = [name for name in COCO_CLASSES if name != NO_COLOUR_CLASS]
    if task == "two_object":
        first, second = rng.choice(classes, size=2, replace=False)
        return two_object(COCO_CLASSES[first], COCO_CLASSES[second])
    if task == "counting":
        count = int(rng.integers(COUNT_RANGE[0], COUNT_RANGE[1], endpoint=True))
        return counting(COCO_CLASSES[rng.integers(classes)], count)
    if task == "colors":
        return colour(colourable[rng.integers(len(colourable))], COLOURS[rng.integers(10)])
    if task == "position":
        first, second = rng.choice(classes, size=2, replace=False)
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        return position(COCO_CLASSES[first], relation, COCO_CLASSES[second])
    if task == "color_attr":
        first, second = rng.choice(len(colourable), size=2, replace=False)
        first_colour, second_colour = rng.choice(len(COLOURS), size=2, replace=False)
        return colour_attribution(
            colourable[first], COLOURS[first_colour], colourable[second], COLOURS[second_colour]
        )
    raise ValueError(f"unknown task {task!r}: one of {list(TASKS)}")


# Draws per wanted prompt before a task is declared exhausted (the spaces are large: 6,320
# ordered pairs, 240 counts, 790 coloured classes; only single_object is small, and it is
# enumerated instead of drawn).
MAX_DRAWS_PER_PROMPT = 50


def generate_prompt_set(
    seed: int = DEFAULT_SEED, per_task: int = DEFAULT_PER_TASK, tasks: tuple[str, ...] = TASKS
) -> list[PromptSpec]:
    """`per_task` distinct prompts of each task in `tasks` (single_object: at most the 80
    classes), in task order; the same list for the same arguments on every machine."""
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1 (got {per_task})")
    specs: list[PromptSpec] = []
    for task_index, task in enumerate(tasks):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: one of {list(TASKS)}")
        rng = numpy.random.default_rng([seed, task_index])
        if task == "single_object":
            order = rng.permutation(len(COCO_CLASSES))[:per_task]
            specs += [single_object(COCO_CLASSES[index]) for index in order]
            continue
        seen: set[str] = set()
        for _ in range(per_task * MAX_DRAWS_PER_PROMPT):
            if len(seen) == per_task:
                break
            spec = _draw(task, rng)
            if spec.key() not in seen:
                seen.add(spec.key())
                specs.append(spec)
        if len(seen) < per_task:
            raise ValueError(f"task {task} has fewer than {per_task} distinct prompts")
    return specs


def interleaved_subset(specs: list[PromptSpec], count: int) -> list[PromptSpec]:
    """The first `count` prompts taken round-robin over the tasks (task order, then each task's
    own order), so that a small subset still covers every task."""
    by_task: dict[str, list[PromptSpec]] = {}
    for spec in specs:
        by_task.setdefault(spec.tag, []).append(spec)
    subset: list[PromptSpec] = []
    position_in_task = 0
    while len(subset) < min(count, len(specs)):
        for task_specs in by_task.values():
            if position_in_task < len(task_specs) and len(subset) < count:
                subset.append(task_specs[position_in_task])
        position_in_task += 1
    return subset


# ---- files -----------------------------------------------------------------------------------


def write_prompt_set(specs: list[PromptSpec], path: str | Path) -> None:
    """One JSON object per line (GenEval's evaluation_metadata.jsonl layout), atomically."""
    from apex_dist.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(spec.to_json()) + "\n" for spec in specs))


def read_prompt_set(path: str | Path) -> list[PromptSpec]:
    """Specs from a JSONL file (this package's or GenEval's own evaluation_metadata.jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} does not exist: write one with `apex-eval prompts {path}` or "
            "give GenEval's evaluation_metadata.jsonl"
        )
    specs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        specs.append(PromptSpec.from_json(value, f"{path}:{number}"))
    if not specs:
        raise ValueError(f"prompt file {path} holds no prompts")
    return specs


def specs_by_prompt(specs: list[PromptSpec]) -> dict[str, PromptSpec]:
    """Prompt text -> spec; a prompt given twice with different metadata is refused."""
    table: dict[str, PromptSpec] = {}
    for spec in specs:
        known: Optional[PromptSpec] = table.get(spec.prompt)
        if known is not None and known.key() != spec.key():
            raise ValueError(
                f"prompt {spec.prompt!r} appears twice with different metadata: an image of it "
                "could not be scored unambiguously"
            )
        table[spec.prompt] = spec
    return table
