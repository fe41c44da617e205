"""A small visual world of coloured shapes, with its words.

Scenes hold one to three shapes (circle, square, triangle) in five colours,
one per horizontal third (left, middle, right). Everything a tiny Flamingo
can learn from is derived from a scene: a caption ("a red circle on the
left and a blue square on the right"), questions with one-word answers
(count, colour, position, shape), a class label for one-shape scenes, and
short videos of one shape moving ("a blue square moves right"), and
interleaved documents of several pictures (`document`), among them
documents that name shapes with made-up words (`NAMES`). All
randomness comes from the generator passed in.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 50, 47), "green": (40, 160, 70), "blue": (38, 100, 220),
    "yellow": (230, 190, 20), "purple": (140, 70, 180),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "middle", "right")
DIRECTIONS = ("left", "right", "up", "down")
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
           "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen")
WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  colour: str
  position: str  # the horizontal third
  x: float  # centre, as a fraction of the canvas
  y: float
  radius: float

  @property
  def name(self) -> str:
    return f"{self.colour} {self.kind}"


Scene = tuple[Shape, ...]


def sample_scene(rng: np.random.Generator, max_shapes: int = 3) -> Scene:
  """1..max_shapes shapes, one per third; one generator call (this runs 10^4 times)."""
  u = rng.random(1 + len(POSITIONS) + 5 * len(POSITIONS)).tolist()
  n = 1 + int(u[0] * max_shapes)
  order = sorted(range(len(POSITIONS)), key=lambda k: u[1 + k])
  names = list(COLOURS)
  shapes = []
  for p in sorted(order[:n]):
    k, c, ux, uy, ur = u[4 + 5 * p:9 + 5 * p]
    shapes.append(Shape(kind=SHAPES[int(k * len(SHAPES))], colour=names[int(c * len(names))],
                        position=POSITIONS[p], x=(p + 0.5) / 3 + 0.08 * (ux - 0.5),
                        y=0.3 + 0.4 * uy, radius=0.09 + 0.05 * ur))
  return tuple(shapes)


def draw_shape(draw: ImageDraw.ImageDraw, s: Shape, size: int) -> None:
  cx, cy, r = s.x * size, s.y * size, s.radius * size
  fill = COLOURS[s.colour]
  if s.kind == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif s.kind == "square":
    draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif s.kind == "triangle":
    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
  else:
    raise ValueError(f"unknown shape kind {s.kind!r}")


def background(rng: np.random.Generator) -> tuple[int, int, int]:
  return tuple(int(v) for v in rng.integers(225, 256, size=3))


def render(scene: Sequence[Shape], size: int, bg: tuple[int, int, int]) -> np.ndarray:
  """uint8 [size, size, 3]."""
  img = Image.new("RGB", (size, size), bg)
  draw = ImageDraw.Draw(img)
  for s in scene:
    draw_shape(draw, s, size)
  return np.asarray(img)


def caption(scene: Sequence[Shape]) -> str:
  parts = [f"a {s.name} {WHERE[s.position]}" for s in scene]
  if len(parts) == 1:
    return parts[0]
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def questions(scene: Sequence[Shape]) -> list[tuple[str, str, str]]:
  """All (question, one-word answer, question type) the scene answers unambiguously."""
  out = [("how many shapes are there?", NUMBERS[len(scene)], "count")]
  kinds = [s.kind for s in scene]
  for s in scene:
    if kinds.count(s.kind) == 1:
      out.append((f"what colour is the {s.kind}?", s.colour, "colour"))
    if sum(o.name == s.name for o in scene) == 1:
      out.append((f"where is the {s.name}?", s.position, "position"))
    out.append((f"what shape is {WHERE[s.position]}?", s.kind, "shape"))
  return out


def label(scene: Sequence[Shape]) -> int:
  """Class index (CLASSES) of a one-shape scene, -1 otherwise."""
  return CLASSES.index(scene[0].name) if len(scene) == 1 else -1


def sample_motion(rng: np.random.Generator) -> tuple[str, str, str]:
  return (SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))],
          DIRECTIONS[int(rng.integers(len(DIRECTIONS)))])


def motion_caption(kind: str, colour: str, direction: str) -> str:
  return f"a {colour} {kind} moves {direction}"


def render_motion(kind: str, colour: str, direction: str, size: int, num_frames: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
  """num_frames uint8 [size, size, 3] of one shape crossing the canvas."""
  bg = background(rng)
  radius = float(rng.uniform(0.09, 0.13))
  across = float(rng.uniform(0.3, 0.7))
  a, b = 0.2, 0.8
  frames = []
  for t in range(num_frames):
    f = t / max(1, num_frames - 1)
    along = {"right": a + (b - a) * f, "left": b - (b - a) * f,
             "down": a + (b - a) * f, "up": b - (b - a) * f}[direction]
    x, y = (along, across) if direction in ("left", "right") else (across, along)
    frames.append(render([Shape(kind, colour, "", x, y, radius)], size, bg))
  return frames


# Made-up names ("a blicket") for the in-context naming documents and the demo's
# name-binding task: which name means which shape changes from document to document
# (and from prompt to prompt), so only the earlier pictures can tell.
NAMES = ("blicket", "dax", "wug", "toma", "fep", "zorp", "kiki", "bouba", "mipo", "gazzer",
         "tufa", "lorp", "quib", "rask", "snerg", "vop", "yeb", "zib", "plim", "norb")
DOCUMENT_KINDS = ("story", "gallery", "quiz", "names")


def naming_text(name: str) -> str:
  """A naming document's text after a picture (and the name-binding task's template)."""
  return f"This is a {name}"


def name_binding(rng: np.random.Generator, k: int = len(SHAPES)) -> dict[str, str]:
  """A fresh assignment of k distinct made-up names to the shape kinds."""
  picks = rng.choice(len(NAMES), size=k, replace=False)
  return {kind: NAMES[int(i)] for kind, i in zip(SHAPES, picks)}


def single_shape_scene(rng: np.random.Generator, kind: str) -> Scene:
  """One shape of the given kind, random colour, in a random third."""
  u = rng.random(5).tolist()
  p = int(u[0] * len(POSITIONS))
  return (Shape(kind=kind, colour=list(COLOURS)[int(u[1] * len(COLOURS))],
                position=POSITIONS[p], x=(p + 0.5) / 3 + 0.08 * (u[2] - 0.5),
                y=0.3 + 0.4 * u[3], radius=0.09 + 0.05 * u[4]),)


def document(rng: np.random.Generator, max_images: int = 4, kind: str = ""
             ) -> tuple[list[str | None], list[Scene | None]]:
  """An interleaved document: parallel lists (OBELICS layout) of texts and scenes.

  Four kinds, as on web pages (`kind` "" draws one uniformly):
    story    "Picture two shows ...", "This one has three shapes: ...", a total
    gallery  every picture followed by its own caption (alt text): several
             images, each text about the image just before it, every caption
             different (the pattern of a few-shot captioning prompt)
    quiz     every picture followed by a question about it and its answer
    names    single shapes named with made-up words ("This is a blicket"), the
             names assigned to the shape kinds afresh per document: a repeated
             kind's name can be read only from the earlier pictures
  2..max_images pictures; text always follows its picture.
  """
  kind = kind or DOCUMENT_KINDS[int(rng.integers(len(DOCUMENT_KINDS)))]
  if kind not in DOCUMENT_KINDS:
    raise ValueError(f"document kind must be one of {DOCUMENT_KINDS}, got {kind!r}")
  n = int(rng.integers(2, max_images + 1))
  texts: list[str | None] = []
  scenes: list[Scene | None] = []

  def picture(scene: Scene, text: str) -> None:
    scenes.extend([scene, None])
    texts.extend([None, text])

  if kind == "gallery":
    for _ in range(n):
      scene = sample_scene(rng)
      picture(scene, caption(scene))
    return texts, scenes
  if kind == "quiz":
    for _ in range(n):
      scene = sample_scene(rng)
      q, a, _ = questions(scene)[int(rng.integers(len(questions(scene))))]
      picture(scene, f"Question: {q} Answer: {a}")
    return texts, scenes
  if kind == "names":
    names = name_binding(rng)
    for _ in range(n):
      shape = SHAPES[int(rng.integers(len(SHAPES)))]
      picture(single_shape_scene(rng, shape), naming_text(names[shape]))
    return texts, scenes
  if rng.random() < 0.5:
    texts.append(str(rng.choice(["Here are some pictures.", "Look at these drawings.",
                                 "A few pictures of shapes."])))
    scenes.append(None)
  total = 0
  for j in range(min(n, 5)):  # NUMBERS counts the total up to fifteen
    scene = sample_scene(rng)
    total += len(scene)
    if rng.random() < 0.5:
      text = f"Picture {NUMBERS[j + 1]} shows {caption(scene)}."
    else:
      plural = "s" if len(scene) > 1 else ""
      text = f"This one has {NUMBERS[len(scene)]} shape{plural}: {caption(scene)}."
    picture(scene, text)
  texts.append(f"In total there are {NUMBERS[total]} shapes.")
  scenes.append(None)
  return texts, scenes
