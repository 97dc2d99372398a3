"""{"section.key": value} overrides of a nested config, shared by the config tests."""


def apply(c, overrides: dict):
  """Sets each dotted key of `overrides` in the ConfigDict or dict `c` (in place); returns c."""
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[last] = value
  return c
