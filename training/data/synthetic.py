"""A synthetic catalog and interaction log with topics, Zipf popularity and drifting interests.

The generator makes data for the demo and the tests whose structure the rest of the pipeline can
find again:

* **Topics.** Each item belongs to one topic (balanced sizes). Its text is built from that topic's
  vocabulary of distinctive English words plus a small shared filler vocabulary::

      "<Title of 3-5 topic words>. <Adjective> w1 and w2 with w3 w4 for <people> who love w5.
      Category: <topic>."

  so a sentence encoder (all-MiniLM) places items of one topic close together.
* **Zipf popularity.** Item ``i`` has weight ``rank_i ** -zipf_exponent`` with the ranks randomly
  permuted over the catalog, so every topic holds a mix of head and tail items and the topics'
  total masses differ too (the topic that draws the head items is the most popular one).
* **Users** hold 2-4 latent interests (topics drawn in proportion to topic mass, without
  replacement) with Dirichlet(1) weights. The number of interactions per user is the floor plus
  a negative-binomial draw (a long tail), so the mean is ``mean_interactions_per_user``.
* **Drift.** Before each interaction, with probability ``drift``, ``drift_step`` of log-weight
  moves from one of the user's interests to another, so interests shift over time.
* **Each interaction** picks a topic by the user's current weights, then an item of that topic by
  popularity; an item never immediately repeats for the same user.
* **Time.** Each user is active over a random sub-window (30-100 % of ``span_days``) with
  exponential gaps between events, so per-user times increase; items' ``event_timestamp`` is the
  start.

Everything is drawn from one ``numpy.random.Generator`` seeded by ``seed`` and vectorized over
all users and interactions, so 50k items x 20k users take a few seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
import pyarrow as pa
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from training.data.contract import TIMESTAMP
from training.data.dataset import LoadedDataset

TOPICS: Final[dict[str, tuple[str, ...]]] = {
    "hiking": (
        "trail", "backpack", "summit", "trailhead", "switchback", "ridgeline", "canteen",
        "headlamp", "gaiters", "trekking", "wilderness", "altitude", "canyon", "ascent",
        "bivouac", "alpine", "moraine", "footpath", "rucksack", "hydration", "topographic",
        "blister", "scramble", "waypoint", "boots", "hiking", "cairn", "meadow", "plateau",
        "glacier",
    ),
    "cooking": (
        "skillet", "recipe", "saucepan", "spatula", "simmer", "braise", "saute", "marinade",
        "garlic", "oregano", "colander", "ladle", "whisk", "stockpot", "cleaver", "julienne",
        "broth", "seasoning", "paprika", "wok", "roux", "peeler", "grater", "casserole",
        "risotto", "stew", "cooking", "cumin", "dumpling", "gravy",
    ),
    "gardening": (
        "compost", "trowel", "seedling", "mulch", "pruning", "shears", "fertilizer",
        "greenhouse", "perennial", "tulip", "daffodil", "hoe", "rake", "soil", "irrigation",
        "watering", "planter", "hedge", "weeding", "trellis", "lawn", "mower", "germination",
        "topsoil", "hydrangea", "seeds", "gardening", "orchard", "petunia", "wheelbarrow",
    ),
    "photography": (
        "camera", "lens", "aperture", "shutter", "tripod", "exposure", "telephoto",
        "viewfinder", "zoom", "flashgun", "headshot", "megapixel", "autofocus", "bokeh",
        "darkroom", "photograph", "snapshot", "mirrorless", "photographer", "polarizer",
        "softbox", "monopod", "macro", "focal", "panorama", "selfie", "photography",
        "portraiture", "photobook", "lightbox",
    ),
    "cycling": (
        "bicycle", "pedal", "derailleur", "handlebar", "saddle", "spokes", "chainring",
        "cassette", "helmet", "peloton", "sprocket", "crankset", "tubeless", "cleats",
        "criterium", "velodrome", "cadence", "brakes", "tire", "wheelset", "jersey", "bike",
        "singletrack", "bidon", "freewheel", "fixie", "tandem", "cycling", "cyclist", "pannier",
    ),
    "astronomy": (
        "telescope", "galaxy", "nebula", "planet", "comet", "asteroid", "orbit",
        "constellation", "eclipse", "lunar", "stargazing", "observatory", "meteor",
        "supernova", "cosmos", "jupiter", "saturn", "equatorial", "eyepiece", "refractor",
        "starlight", "spectroscopy", "quasar", "parsec", "celestial", "solstice",
        "planetarium", "aurora", "astronomy", "astronomer",
    ),
    "music": (
        "guitar", "chord", "melody", "amplifier", "fretboard", "piano", "drumsticks",
        "metronome", "harmony", "rhythm", "tempo", "ukulele", "violin", "cello", "saxophone",
        "trumpet", "microphone", "tuner", "capo", "acoustic", "concert", "orchestra",
        "symphony", "bassline", "lyrics", "songwriting", "setlist", "music", "musician",
        "sonata",
    ),
    "fishing": (
        "rod", "reel", "tackle", "lure", "bait", "hook", "angler", "trout", "bobber", "fly",
        "catfish", "salmon", "sinker", "spinnerbait", "waders", "creel", "minnow", "casting",
        "fishhook", "fishing", "pike", "walleye", "swivel", "trolling", "perch", "carp",
        "fisherman", "jigging", "baitcaster", "riverbank",
    ),
    "painting": (
        "canvas", "easel", "paintbrush", "acrylic", "watercolor", "palette", "pigment",
        "gouache", "impasto", "sketch", "charcoal", "masterpiece", "mural", "fresco",
        "turpentine", "abstract", "gallery", "brushstroke", "pastel", "crayon", "illustration",
        "shading", "hue", "vermilion", "ultramarine", "sienna", "painting", "painter",
        "landscape", "linseed",
    ),
    "coffee": (
        "espresso", "latte", "cappuccino", "barista", "grinder", "arabica", "robusta", "crema",
        "portafilter", "tamper", "percolator", "demitasse", "decaf", "mocha", "macchiato",
        "americano", "caffeine", "mug", "aeropress", "brew", "cafe", "frothing", "dripper",
        "cortado", "coffee", "roaster", "beans", "kettle", "carafe", "affogato",
    ),
    "woodworking": (
        "chisel", "lathe", "sawdust", "plywood", "dovetail", "jigsaw", "router", "sander",
        "clamp", "workbench", "mallet", "hardwood", "oak", "lumber", "planer", "joinery",
        "mortise", "tenon", "bandsaw", "varnish", "dowel", "veneer", "birch", "carpentry",
        "drill", "timber", "woodshop", "sandpaper", "bevel", "woodworking",
    ),
    "aquarium": (
        "aquarium", "fishbowl", "guppy", "tetra", "goldfish", "cichlid", "coral", "reef",
        "filtration", "aerator", "gravel", "substrate", "heater", "snail", "shrimp", "algae",
        "betta", "angelfish", "driftwood", "aquascape", "pump", "salinity", "hydrometer",
        "nitrate", "ammonia", "pleco", "molly", "plankton", "aquatic", "tank",
    ),
    "chess": (
        "chessboard", "pawn", "bishop", "knight", "rook", "queen", "king", "checkmate",
        "gambit", "endgame", "castling", "grandmaster", "stalemate", "fianchetto", "sicilian",
        "blitz", "notation", "chessmen", "zugzwang", "tactics", "sacrifice", "promotion",
        "kingside", "queenside", "tournament", "chess", "opening", "fork", "pin", "skewer",
    ),
    "sewing": (
        "needle", "thread", "bobbin", "thimble", "fabric", "seam", "hem", "stitch", "quilt",
        "pattern", "embroidery", "sewing", "pincushion", "zipper", "button", "denim", "cotton",
        "linen", "spool", "tailor", "applique", "serger", "selvage", "yardage", "muslin",
        "pleat", "darning", "crochet", "yarn", "seamstress",
    ),
    "gaming": (
        "console", "controller", "joystick", "gamepad", "multiplayer", "leaderboard",
        "respawn", "quest", "dungeon", "headset", "mouse", "esports", "streaming", "arcade",
        "speedrun", "cartridge", "handheld", "achievement", "loot", "raid", "roleplaying",
        "shooter", "platformer", "checkpoint", "gameplay", "glitch", "modding", "gaming",
        "gamer", "keyboard",
    ),
    "sailing": (
        "sailboat", "mast", "keel", "rudder", "hull", "anchor", "jib", "spinnaker", "mainsail",
        "regatta", "helm", "starboard", "nautical", "buoy", "mooring", "tiller", "halyard",
        "dinghy", "catamaran", "marina", "harbor", "yacht", "bowline", "windward", "leeward",
        "compass", "navigation", "lifejacket", "sailing", "sailor",
    ),
}  # fmt: skip
"""Topic name -> distinctive words; no word belongs to two topics or to the fillers."""

ADJECTIVES: Final = (
    "classic", "modern", "simple", "durable", "lightweight", "premium", "essential", "compact",
    "reliable", "versatile", "practical", "handy", "deluxe", "original", "sturdy", "elegant",
)  # fmt: skip
"""Shared filler adjectives that open an item's description."""

USES: Final = (
    "beginners", "experts", "families", "students", "friends", "professionals", "enthusiasts",
    "collectors", "kids", "travelers", "hobbyists", "clubs",
)  # fmt: skip
"""Shared filler words for who an item is for."""

_TITLE_WORDS: Final = (3, 5)
_DESCRIPTION_TOPIC_WORDS: Final = 5
_NB_DISPERSION: Final = 2.0  # negative-binomial shape: smaller = longer tail of heavy users
_ACTIVE_FRACTION: Final = (0.3, 1.0)
_MAX_RESAMPLE_ROUNDS: Final = 64
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class SynthConfig(BaseModel):
    """Settings of :func:`generate_synthetic`; every field is validated and unknown ones refused."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(7, ge=0, description="Seed of the numpy Generator; same seed, same tables.")
    n_items: int = Field(2000, ge=1, description="Catalog size (at least 3 items per topic).")
    n_users: int = Field(500, ge=1, description="Number of users.")
    n_topics: int = Field(
        12, ge=2, le=len(TOPICS), description=f"Topics used, the first n of {len(TOPICS)}."
    )
    min_interests_per_user: int = Field(2, ge=1, description="Fewest latent interests per user.")
    max_interests_per_user: int = Field(4, ge=1, description="Most latent interests per user.")
    mean_interactions_per_user: float = Field(
        40.0, gt=0, description="Mean interactions per user (floor + negative-binomial tail)."
    )
    min_interactions_per_user: int = Field(
        8, ge=1, description="Floor on each user's interactions."
    )
    zipf_exponent: float = Field(
        1.1, ge=0, description="Item popularity is rank ** -zipf_exponent (0 = uniform)."
    )
    drift: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Probability per interaction of shifting weight between the user's interests.",
    )
    drift_step: float = Field(
        1.0, ge=0, description="Log-weight moved from one interest to another per drift event."
    )
    start: AwareDatetime = Field(
        datetime(2024, 1, 1, tzinfo=UTC), description="Start of the time window (tz-aware)."
    )
    span_days: float = Field(90.0, gt=0, description="Length of the time window in days.")

    @model_validator(mode="after")
    def _consistent(self) -> SynthConfig:
        if self.min_interests_per_user > self.max_interests_per_user:
            raise ValueError("min_interests_per_user must be <= max_interests_per_user")
        if self.max_interests_per_user > self.n_topics:
            raise ValueError("max_interests_per_user must be <= n_topics")
        if self.n_items < 3 * self.n_topics:
            # >= 3 items per topic so an item can always avoid repeating either neighbour.
            raise ValueError(f"n_items must be >= 3 * n_topics = {3 * self.n_topics}")
        if self.mean_interactions_per_user < self.min_interactions_per_user:
            raise ValueError("mean_interactions_per_user must be >= min_interactions_per_user")
        return self


def generate_synthetic(cfg: SynthConfig) -> LoadedDataset:
    """Generate a synthetic catalog and interaction log (see the module docstring for the model).

    Args:
        cfg: Generator settings.

    Returns:
        The dataset named ``synthetic``: items with ``category`` = topic name, interactions sorted
        by user then time; ``info`` holds counts, the topic count and the popularity Gini.
    """
    rng = np.random.default_rng(cfg.seed)
    topics = list(TOPICS)[: cfg.n_topics]

    item_topic = rng.permutation(np.arange(cfg.n_items) % cfg.n_topics)
    popularity = (rng.permutation(cfg.n_items) + 1.0) ** -cfg.zipf_exponent
    popularity /= popularity.sum()
    sampler = _TopicSampler(item_topic, popularity, cfg.n_topics)
    texts = _item_texts(rng, item_topic, topics)

    counts = _interaction_counts(rng, cfg)
    owner = np.repeat(np.arange(cfg.n_users), counts)
    first_row = np.cumsum(counts) - counts
    topic = _interaction_topics(rng, cfg, sampler.topic_mass, counts, owner, first_row)
    item = sampler.sample(topic, rng.random(len(topic)))
    item = _remove_immediate_repeats(rng, item, topic, owner, sampler)
    seconds = _interaction_seconds(rng, cfg, counts, owner, first_row)

    start_us = (cfg.start - _EPOCH) // timedelta(microseconds=1)
    item_ids = _ids("i", cfg.n_items)
    user_ids = _ids("u", cfg.n_users)
    items = pa.table(
        {
            "item_id": pa.array(item_ids, pa.string()),
            "text": pa.array(texts, pa.string()),
            "event_timestamp": pa.array(np.full(cfg.n_items, start_us), pa.int64()).cast(TIMESTAMP),
            "category": pa.array([topics[t] for t in item_topic], pa.string()),
        }
    )
    # Rows are generated user by user in time order, and zero-padded ids sort like numbers, so
    # the table is already sorted by (user_id, event_timestamp).
    interactions = pa.table(
        {
            "user_id": pa.array(np.asarray(user_ids, dtype=object)[owner], pa.string()),
            "item_id": pa.array(np.asarray(item_ids, dtype=object)[item], pa.string()),
            "event_timestamp": pa.array(start_us + seconds * 1_000_000, pa.int64()).cast(TIMESTAMP),
        }
    )
    item_counts = np.bincount(item, minlength=cfg.n_items)
    start = cfg.start.astimezone(UTC)
    info: dict[str, Any] = {
        "n_items": cfg.n_items,
        "n_users": cfg.n_users,
        "n_interactions": len(item),
        "n_topics": cfg.n_topics,
        "popularity_gini": round(gini(item_counts), 4),
        "time_start": start.isoformat(),
        "time_end": (start + timedelta(days=cfg.span_days)).isoformat(),
        "timestamps_synthesized": True,
    }
    return LoadedDataset("synthetic", items, interactions, info)


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative ``values`` (0 = all equal, near 1 = all in one).

    Args:
        values: Non-negative amounts, e.g. interactions per item.

    Returns:
        The coefficient in [0, 1); 0.0 for an empty or all-zero input.
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = len(x), float(x.sum())
    if n == 0 or total == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(2.0 * np.sum(ranks * x) / (n * total) - (n + 1.0) / n)


class _TopicSampler:
    """Draws items of a given topic in proportion to popularity, by inverse CDF (vectorized).

    Items are laid out topic by topic, most popular first; ``cumulative`` is the running sum of
    popularity over that layout, so topic ``t`` owns the slice ``(before[t], before[t] + mass[t]]``
    and a uniform draw inside it lands on an item of ``t`` with the right probability.
    """

    def __init__(self, item_topic: np.ndarray, popularity: np.ndarray, n_topics: int) -> None:
        self.order = np.lexsort((-popularity, item_topic))
        sorted_topic = item_topic[self.order]
        self.first = np.searchsorted(sorted_topic, np.arange(n_topics), side="left")
        self.last = np.searchsorted(sorted_topic, np.arange(n_topics), side="right") - 1
        self.cumulative = np.cumsum(popularity[self.order])
        self.before = np.concatenate([[0.0], self.cumulative])[self.first]
        self.topic_mass = np.bincount(item_topic, weights=popularity, minlength=n_topics)

    def sample(self, topic: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """Item indices, one per entry of ``topic``, using the uniforms ``uniform`` in [0, 1)."""
        target = self.before[topic] + uniform * self.topic_mass[topic]
        position = np.searchsorted(self.cumulative, target, side="right")
        # Float round-off at a slice edge could step into a neighbouring topic: clamp.
        position = np.clip(position, self.first[topic], self.last[topic])
        result: np.ndarray = self.order[position]
        return result

    def items_of(self, topic: int) -> np.ndarray:
        """Items of ``topic``, most popular first."""
        result: np.ndarray = self.order[self.first[topic] : self.last[topic] + 1]
        return result


def _item_texts(rng: np.random.Generator, item_topic: np.ndarray, topics: list[str]) -> list[str]:
    """One text per item from its topic's vocabulary and the shared fillers."""
    n_items = len(item_topic)
    vocab_size = max(len(TOPICS[t]) for t in topics)
    vocab = np.array([list(TOPICS[t]) + [""] * (vocab_size - len(TOPICS[t])) for t in topics])
    sizes = np.array([len(TOPICS[t]) for t in topics])
    # A random permutation of each item's topic words (padding sorts last): distinct words
    # without a per-item shuffle call.
    keys = rng.random((n_items, vocab_size))
    keys[np.arange(vocab_size)[None, :] >= sizes[item_topic][:, None]] = np.inf
    words = vocab[item_topic[:, None], np.argsort(keys, axis=1)]
    n_title = rng.integers(_TITLE_WORDS[0], _TITLE_WORDS[1] + 1, size=n_items)
    adjectives = np.array(ADJECTIVES)[rng.integers(len(ADJECTIVES), size=n_items)]
    uses = np.array(USES)[rng.integers(len(USES), size=n_items)]
    texts = []
    for i in range(n_items):
        k = int(n_title[i])
        title = " ".join(w.capitalize() for w in words[i, :k])
        w = words[i, k : k + _DESCRIPTION_TOPIC_WORDS]
        description = (
            f"{adjectives[i].capitalize()} {w[0]} and {w[1]} with {w[2]} {w[3]} "
            f"for {uses[i]} who love {w[4]}"
        )
        texts.append(f"{title}. {description}. Category: {topics[item_topic[i]]}.")
    return texts


def _interaction_counts(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """Interactions per user: the floor plus a negative-binomial draw with the right mean."""
    extra_mean = cfg.mean_interactions_per_user - cfg.min_interactions_per_user
    if extra_mean <= 0:
        return np.full(cfg.n_users, cfg.min_interactions_per_user, dtype=np.int64)
    p = _NB_DISPERSION / (_NB_DISPERSION + extra_mean)
    extra = rng.negative_binomial(_NB_DISPERSION, p, size=cfg.n_users)
    counts: np.ndarray = cfg.min_interactions_per_user + extra.astype(np.int64)
    return counts


def _segment_cumsum(values: np.ndarray, first_row: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Running sum of ``values`` (rows, optionally x columns) restarting at each user's row."""
    total = np.cumsum(values, axis=0)
    padded = np.concatenate([np.zeros((1, *values.shape[1:])), total])
    result: np.ndarray = total - padded[first_row][owner]
    return result


def _interaction_topics(
    rng: np.random.Generator,
    cfg: SynthConfig,
    topic_mass: np.ndarray,
    counts: np.ndarray,
    owner: np.ndarray,
    first_row: np.ndarray,
) -> np.ndarray:
    """The topic of every interaction, from each user's drifting interest weights."""
    n_rows, slots = len(owner), cfg.max_interests_per_user
    n_interests = rng.integers(
        cfg.min_interests_per_user, cfg.max_interests_per_user + 1, size=cfg.n_users
    )
    # Gumbel top-k: each user's interests are a draw without replacement, in proportion to
    # topic mass, so popular topics attract more users.
    keys = np.log(topic_mass)[None, :] + rng.gumbel(size=(cfg.n_users, cfg.n_topics))
    interests = np.argsort(-keys, axis=1)[:, :slots]
    valid = np.arange(slots)[None, :] < n_interests[:, None]
    # Dirichlet(1) weights are normalized exponentials; softmax makes the normalization moot.
    log_weight = np.where(valid, np.log(rng.exponential(size=(cfg.n_users, slots))), -np.inf)

    # Drift: on event rows, drift_step of log-weight moves from slot a to another slot b; the
    # running sum per user gives the weights in force at every later row.
    k = n_interests[owner]
    event = (rng.random(n_rows) < cfg.drift) & (k > 1)
    rows = np.flatnonzero(event)
    a = np.floor(rng.random(len(rows)) * k[rows]).astype(np.int64)
    b = (a + 1 + np.floor(rng.random(len(rows)) * (k[rows] - 1)).astype(np.int64)) % k[rows]
    shift = np.zeros((n_rows, slots))
    shift[rows, a] -= cfg.drift_step
    shift[rows, b] += cfg.drift_step
    logits = log_weight[owner] + _segment_cumsum(shift, first_row, owner)

    logits -= logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    cumulative = np.cumsum(prob / prob.sum(axis=1, keepdims=True), axis=1)
    slot = (rng.random(n_rows)[:, None] > cumulative).sum(axis=1)
    slot = np.minimum(slot, k - 1)  # round-off can leave the last cumulative value below 1
    result: np.ndarray = interests[owner, slot]
    return result


def _remove_immediate_repeats(
    rng: np.random.Generator,
    item: np.ndarray,
    topic: np.ndarray,
    owner: np.ndarray,
    sampler: _TopicSampler,
) -> np.ndarray:
    """Redraw (same topic, by popularity) every item equal to the user's previous one."""
    item = item.copy()
    same_user = np.zeros(len(item), dtype=bool)
    same_user[1:] = owner[1:] == owner[:-1]

    def repeats() -> np.ndarray:
        repeat = np.zeros(len(item), dtype=bool)
        repeat[1:] = item[1:] == item[:-1]
        return np.flatnonzero(repeat & same_user)

    for _ in range(_MAX_RESAMPLE_ROUNDS):
        rows = repeats()
        if len(rows) == 0:
            return item
        item[rows] = sampler.sample(topic[rows], rng.random(len(rows)))
    # A head item can hold most of a small topic's mass; the few rows still repeating after
    # many redraws take the most popular item of their topic that differs from both neighbours.
    for row in repeats():
        neighbours = {int(item[row - 1])}
        if row + 1 < len(item) and same_user[row + 1]:
            neighbours.add(int(item[row + 1]))
        item[row] = next(i for i in sampler.items_of(int(topic[row])) if int(i) not in neighbours)
    return item


def _interaction_seconds(
    rng: np.random.Generator,
    cfg: SynthConfig,
    counts: np.ndarray,
    owner: np.ndarray,
    first_row: np.ndarray,
) -> np.ndarray:
    """Whole seconds after ``start`` of every interaction, increasing within each user."""
    span = cfg.span_days * 86400.0
    active = rng.uniform(*_ACTIVE_FRACTION, size=cfg.n_users) * span
    offset = rng.uniform(size=cfg.n_users) * (span - active)
    gaps = rng.exponential(size=len(owner))
    elapsed = _segment_cumsum(gaps, first_row, owner)
    # One more gap after the last event, so the user's last event is not pinned to the end.
    total = elapsed[first_row + counts - 1] + rng.exponential(size=cfg.n_users)
    seconds = offset[owner] + active[owner] * elapsed / total[owner]
    # floor keeps the per-user order (it is monotone) and stays inside the window.
    result: np.ndarray = np.floor(seconds).astype(np.int64)
    return result


def _ids(prefix: str, n: int) -> list[str]:
    """Zero-padded ids (``u00042``) so string order equals numeric order."""
    width = max(5, len(str(n - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]
