"""Random names suggested for new nodes: easy to say, unlikely to repeat."""

from __future__ import annotations

import secrets

_ADJECTIVES = ("amber", "brisk", "calm", "clever", "crimson", "eager", "gentle", "golden", "hidden", "humble",
               "keen", "lively", "lucky", "mellow", "nimble", "quiet", "rapid", "silent", "steady", "swift",
               "tidy", "vivid", "wise", "young")
_NOUNS = ("badger", "comet", "falcon", "fjord", "glacier", "harbor", "heron", "lynx", "maple", "meadow", "nebula",
          "otter", "panda", "pebble", "quartz", "raven", "river", "summit", "thistle", "tiger", "walrus", "willow")


def node_name_suggestion() -> str:
    return f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}"
