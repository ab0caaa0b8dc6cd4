"""The `megavictor` verbs that sit on top of the library and have no package of their own: `split`, `convert`."""
