"""Name -> factory tables, so one config string picks a loss, optimizer, scheduler or augmentation.

Usage:
    LOSSES = Registry("loss")
    @LOSSES.register("ce")
    def cross_entropy(**kw): ...
    loss_fn = LOSSES.build("ce")        # unknown names raise KeyError listing the known ones
"""


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        def add(fn):
            assert name not in self, f"{self.kind} {name!r} registered twice"
            self[name] = fn
            return fn
        return add

    def build(self, name: str, *args, **kwargs):
        if name not in self:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {sorted(self)}")
        return self[name](*args, **kwargs)
