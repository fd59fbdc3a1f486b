"""The synthetic world's scenes: what is in each image, sampled from a seed.

An image is a 3 x 3 grid of cells on a plain light canvas. A scene puts one to four objects
in distinct cells; each object is a colour x shape ("red circle") with a random size and a
small random offset inside its cell, so objects never overlap and every object has one
named place ("top left", "top", ..., "bottom right"). Within one scene every shape and
every colour occurs at most once, so "the triangle" and "the red object" are unambiguous.

The objects of the hallucination metrics are the shapes (CHAIR counts shapes, as it counts
COCO classes; colour and place are attributes, asked about by multiple-choice questions).
The language prior is defined over shapes too: `WorldConfig.prior_pairs` lists pairs of
shapes that co-occur often. When a scene is sampled, each object after the first is, with
probability `prior_strength`, the partner of a shape already in the scene (when one is still
missing); otherwise it is drawn by `shape_weights` from the shapes not yet used. So partners
co-occur far more often than other shapes (the co-occurrence a model can learn), and shapes
have unequal frequencies (what POPE's "popular" negatives need).

Everything is a function of the seed: each purpose (scene layout, description phrasing,
questions ...) draws from its own `random.Random` seeded with a string made of the purpose
and the seed (`world_rng`), never from the global RNG, so adding a question type does not
change any image. Train / validation / test scenes are disjoint ranges of seeds.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------
# Places: the 3 x 3 grid, in reading order (row by row, left to right)
# ----------------------------------------------------------------------------------------

GRID = 3
PLACES = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
# PLACES[cell] names cell = row * 3 + col. "top" is the top-middle cell, "left" the
# middle-left one: the world's place names are labels of cells, not loose directions.

SPLITS = ("train", "validation", "test")

# Shapes the renderer (lvlm/world/render.py) can draw.
KNOWN_SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "heart")


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines the world. Frozen (hashable) so statistics can be cached per config.

    canvas_size: side of the square image in pixels (64 by default; the geometry scales).
    background: RGB of the plain canvas.
    colours: (name, (r, g, b)) pairs; chosen far apart in RGB (pairwise distance > 80) and far
        from the background, so a small vision model can tell them apart.
    shapes: shape names, a subset of KNOWN_SHAPES.
    shape_weights: relative frequency of each shape (same order as `shapes`) when a shape
        is drawn freely; unequal on purpose, so "popular" POPE negatives differ from random.
    min_objects, max_objects: objects per scene, uniform in [min, max].
    object_size: (min, max) side of an object's box as a fraction of the cell side.
    margin: pixels kept free at each cell edge (so neighbouring objects never touch).
    prior_pairs: pairs of shapes that co-occur often (the language prior); symmetric.
    prior_strength: probability that each object after the first is a missing partner.
    noise_share: probability that a description (of an image where some present shape's
        partner is absent) gets one extra sentence about such an absent partner -- the
        hallucination carried by machine-written instruction data. See text.describe.
    noise_position: "end" (the extra sentence follows the true ones) or "reading_order"
        (it goes where its made-up cell falls in reading order).
    description_templates: "per_sentence" (each sentence of a description draws its own
        SENTENCE_TEMPLATES phrasing) or "per_description" (one phrasing for all of them; see
        text.describe). Captions always draw per sentence.
    n_train, n_validation, n_test: number of scenes per split.
    train_offset, validation_offset, test_offset: first seed of each split; the seed ranges
        [offset, offset + n) must be disjoint.
    statistics_scenes: how many training scenes the object frequencies and co-occurrence
        counts (for popular / adversarial POPE negatives) are computed from.
    """

    canvas_size: int = 64
    background: tuple = (236, 236, 236)
    colours: tuple = (
        ("red", (215, 35, 35)),
        ("green", (35, 155, 55)),
        ("blue", (40, 80, 225)),
        ("yellow", (240, 215, 20)),
        ("purple", (135, 45, 175)),
        ("orange", (245, 130, 10)),
    )
    shapes: tuple = ("circle", "square", "triangle", "star", "cross", "diamond")
    shape_weights: tuple = (0.24, 0.21, 0.17, 0.15, 0.13, 0.10)
    min_objects: int = 1
    max_objects: int = 4
    object_size: tuple = (0.65, 0.85)
    margin: int = 1
    prior_pairs: tuple = (("circle", "triangle"), ("square", "star"), ("cross", "diamond"))
    prior_strength: float = 0.6
    noise_share: float = 0.5
    noise_position: str = "end"
    description_templates: str = "per_sentence"
    n_train: int = 20000
    n_validation: int = 1000
    n_test: int = 1000
    train_offset: int = 0
    validation_offset: int = 1_000_000
    test_offset: int = 2_000_000
    statistics_scenes: int = 2000

    def __post_init__(self):
        where = "WorldConfig"
        # Lists given by a caller become tuples: the config must stay hashable (see shape_statistics).
        for name in ("background", "shapes", "shape_weights", "object_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "colours", tuple((name, tuple(rgb)) for name, rgb in self.colours))
        object.__setattr__(self, "prior_pairs", tuple(tuple(pair) for pair in self.prior_pairs))
        if self.canvas_size < 3 * GRID * 4:
            raise ValueError(f"{where}: canvas_size {self.canvas_size} is too small (need >= {3 * GRID * 4} px)")
        names = [name for name, _ in self.colours]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: colour names are not unique: {names}")
        for name, rgb in self.colours:
            if len(rgb) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in rgb):
                raise ValueError(f"{where}: colour {name!r} must be an (r, g, b) tuple of ints 0..255, got {rgb!r}")
            if tuple(rgb) == tuple(self.background):
                raise ValueError(f"{where}: colour {name!r} equals the background {self.background}")
        if len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"{where}: shapes are not unique: {self.shapes}")
        unknown = [s for s in self.shapes if s not in KNOWN_SHAPES]
        if unknown:
            raise ValueError(f"{where}: the renderer cannot draw shapes {unknown}; known: {KNOWN_SHAPES}")
        if len(self.shape_weights) != len(self.shapes) or any(w <= 0 for w in self.shape_weights):
            raise ValueError(
                f"{where}: shape_weights must be {len(self.shapes)} positive numbers (one per shape), "
                f"got {self.shape_weights}"
            )
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"{where}: need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        most = min(GRID * GRID, len(self.shapes), len(self.colours))
        if self.max_objects > most:
            raise ValueError(
                f"{where}: max_objects {self.max_objects} > {most} (objects need distinct cells, shapes and colours)"
            )
        low, high = self.object_size
        if not 0 < low <= high <= 1:
            raise ValueError(f"{where}: object_size must satisfy 0 < min <= max <= 1, got {self.object_size}")
        for pair in self.prior_pairs:
            if len(pair) != 2 or pair[0] == pair[1] or any(s not in self.shapes for s in pair):
                raise ValueError(f"{where}: prior pair {pair!r} must be two different shapes from {self.shapes}")
        for name in ("prior_strength", "noise_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{where}: {name} must be in [0, 1], got {value}")
        if self.noise_position not in ("end", "reading_order"):
            raise ValueError(f"{where}: noise_position must be 'end' or 'reading_order', got {self.noise_position!r}")
        if self.description_templates not in ("per_sentence", "per_description"):
            raise ValueError(f"{where}: description_templates must be 'per_sentence' or 'per_description', "
                             f"got {self.description_templates!r}")
        ranges = sorted((getattr(self, f"{s}_offset"), getattr(self, f"n_{s}"), s) for s in SPLITS)
        for start, size, split in ranges:
            if start < 0 or size < 0:
                raise ValueError(f"{where}: split {split!r} has a negative offset or size ({start}, {size})")
        for (start_a, size_a, a), (start_b, _, b) in zip(ranges, ranges[1:]):
            if start_a + size_a > start_b:
                raise ValueError(
                    f"{where}: seed ranges of splits {a!r} [{start_a}, {start_a + size_a}) and {b!r} "
                    f"(from {start_b}) overlap"
                )

    # Small derived views -------------------------------------------------------------
    @property
    def colour_names(self) -> tuple:
        return tuple(name for name, _ in self.colours)

    def rgb(self, colour: str) -> tuple:
        """The RGB triple of a colour name."""
        for name, rgb in self.colours:
            if name == colour:
                return tuple(rgb)
        raise ValueError(f"unknown colour {colour!r}; the world's colours are {self.colour_names}")

    def partners(self, shape: str) -> tuple:
        """Shapes that co-occur with `shape` under the language prior, sorted."""
        found = {b for a, b in self.prior_pairs if a == shape} | {a for a, b in self.prior_pairs if b == shape}
        return tuple(sorted(found))


DEFAULT_CONFIG = WorldConfig()


def world_rng(seed: int, purpose: str, variant: int = 0) -> random.Random:
    """A private random stream for one image and one purpose ("scene", "describe", ...).

    random.Random seeded with a string is deterministic across runs and machines (it is
    hashed with SHA-512, not with Python's salted hash).
    """
    return random.Random(f"lvlm.world/{purpose}/{int(seed)}/{int(variant)}")


# ----------------------------------------------------------------------------------------
# Objects and scenes
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldObject:
    """One object: colour, shape, cell (0..8, reading order) and its box in pixels.

    bbox = (left, top, right, bottom) with right and bottom exclusive (PIL's crop-box
    convention): the object's pixels lie in x in [left, right), y in [top, bottom).
    """

    colour: str
    shape: str
    cell: int
    bbox: tuple

    @property
    def place(self) -> str:
        return PLACES[self.cell]

    @property
    def name(self) -> str:
        """"red circle"."""
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple:
        """(x, y) of the pixel at the middle of the box."""
        left, top, right, bottom = self.bbox
        return ((left + right - 1) // 2, (top + bottom - 1) // 2)


@dataclass(frozen=True)
class Scene:
    """One image's ground truth: seed, objects in reading order, split ("train", ... or None).

    Thin conveniences call the module functions: `image()` (render.render_scene),
    `describe(variant)` (text.describe), `captions()` (text.captions).
    """

    seed: int
    objects: tuple
    split: str | None
    config: WorldConfig = field(default=DEFAULT_CONFIG, repr=False, compare=False)

    @property
    def shapes(self) -> tuple:
        """The canonical objects of the scene (its shapes), in reading order."""
        return tuple(o.shape for o in self.objects)

    def object_with_shape(self, shape: str):
        """The object of that shape, or None when the shape is absent."""
        for o in self.objects:
            if o.shape == shape:
                return o
        return None

    def image(self):
        from .render import render_scene

        return render_scene(self)

    def describe(self, variant: int = 0, **kwargs):
        from .text import describe

        return describe(self, variant, **kwargs)

    def captions(self, count: int = 5):
        from .text import captions

        return captions(self, count)


def cell_box(cell: int, canvas_size: int) -> tuple:
    """(left, top, right, bottom) pixel bounds of a grid cell (right/bottom exclusive)."""
    if not 0 <= cell < GRID * GRID:
        raise ValueError(f"cell must be in 0..{GRID * GRID - 1}, got {cell}")
    row, col = divmod(cell, GRID)
    edges = [round(i * canvas_size / GRID) for i in range(GRID + 1)]
    return (edges[col], edges[row], edges[col + 1], edges[row + 1])


def _object_size_range(config: WorldConfig) -> tuple:
    """(min, max) side of an object's box in pixels, limited by the smallest cell."""
    smallest_cell = min(r - l for l, _, r, _ in (cell_box(c, config.canvas_size) for c in range(GRID)))
    room = smallest_cell - 2 * config.margin
    low = max(4, round(config.object_size[0] * smallest_cell))
    high = min(room, round(config.object_size[1] * smallest_cell))
    return min(low, high), high


def _weighted_choice(rng: random.Random, items: list, weights: list):
    return rng.choices(items, weights=weights, k=1)[0]


def sample_shapes(rng: random.Random, n: int, config: WorldConfig) -> list:
    """n distinct shapes under the co-occurrence prior (see the module docstring)."""
    weight = dict(zip(config.shapes, config.shape_weights))
    chosen = []
    for _ in range(n):
        remaining = [s for s in config.shapes if s not in chosen]
        missing_partners = sorted({p for s in chosen for p in config.partners(s)} - set(chosen))
        if missing_partners and rng.random() < config.prior_strength:
            chosen.append(rng.choice(missing_partners))
        else:
            chosen.append(_weighted_choice(rng, remaining, [weight[s] for s in remaining]))
    return chosen


def split_of_seed(seed: int, config: WorldConfig = DEFAULT_CONFIG) -> str | None:
    """The split whose seed range holds `seed`, or None for a seed outside all of them."""
    for split in SPLITS:
        start = getattr(config, f"{split}_offset")
        if start <= seed < start + getattr(config, f"n_{split}"):
            return split
    return None


def split_seeds(split: str, config: WorldConfig = DEFAULT_CONFIG) -> range:
    """The seeds of a split: range(offset, offset + n)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    start = getattr(config, f"{split}_offset")
    return range(start, start + getattr(config, f"n_{split}"))


def sample_scene(seed: int, config: WorldConfig = DEFAULT_CONFIG) -> Scene:
    """The scene of one seed: objects (distinct shapes, colours and cells) in reading order.

    Draw order (all from world_rng(seed, "scene")): number of objects, shapes (prior),
    colours, cells, then per object its size and offset inside the cell. A scene is immutable, so
    the last ones drawn are kept and handed out again (the build's stages draw each training
    scene a dozen times).
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"sample_scene: seed must be a non-negative int, got {seed!r}")
    return _sample_scene(seed, config)


@functools.lru_cache(maxsize=1 << 14)
def _sample_scene(seed: int, config: WorldConfig) -> Scene:
    rng = world_rng(seed, "scene")
    n = rng.randint(config.min_objects, config.max_objects)
    shapes = sample_shapes(rng, n, config)
    colours = rng.sample(list(config.colour_names), n)
    cells = rng.sample(range(GRID * GRID), n)
    size_low, size_high = _object_size_range(config)
    objects = []
    for shape, colour, cell in zip(shapes, colours, cells):
        left, top, right, bottom = cell_box(cell, config.canvas_size)
        size = rng.randint(size_low, size_high)
        x = rng.randint(left + config.margin, right - config.margin - size)
        y = rng.randint(top + config.margin, bottom - config.margin - size)
        objects.append(WorldObject(colour, shape, cell, (x, y, x + size, y + size)))
    objects.sort(key=lambda o: o.cell)
    return Scene(seed, tuple(objects), split_of_seed(seed, config), config)


def scenes(split: str, config: WorldConfig = DEFAULT_CONFIG, limit: int | None = None):
    """Iterate over the scenes of a split (the first `limit` of them when given)."""
    seeds = split_seeds(split, config)
    if limit is not None:
        seeds = seeds[:limit]
    for seed in seeds:
        yield sample_scene(seed, config)


# ----------------------------------------------------------------------------------------
# Statistics of the training split (for POPE's popular and adversarial negatives)
# ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def shape_statistics(config: WorldConfig = DEFAULT_CONFIG) -> tuple:
    """(frequency, co_occurrence) over the first `statistics_scenes` training scenes.

    frequency: {shape: number of scenes containing it}.
    co_occurrence: {(a, b): number of scenes containing both}, for every ordered pair a != b.
    POPE (Li et al. 2023) ranks "popular" negatives by frequency in the dataset's ground
    truth and "adversarial" ones by co-occurrence with the image's objects; these counts play
    that role here.
    """
    frequency = {s: 0 for s in config.shapes}
    co_occurrence = {(a, b): 0 for a in config.shapes for b in config.shapes if a != b}
    for seed in split_seeds("train", config)[: config.statistics_scenes]:
        present = sample_scene(seed, config).shapes
        for a in present:
            frequency[a] += 1
            for b in present:
                if a != b:
                    co_occurrence[(a, b)] += 1
    return frequency, co_occurrence
