"""stability_blocks() returning pairs (accepted) and the shapes it must not return (each a one-line
error naming the hook): bare modules, a module, an empty list, a module the model does not own, one
module twice, a list given as the attribute (a generator is accepted); and a
forward that fails in the user's own code (the error names its line)."""

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, returns: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.returns = returns

    def stability_blocks(self) -> object:
        return {
            "pairs": [("a", self.a), ("b", self.b)],
            "bare": [self.a, self.b],
            "module": self.a,
            "empty": [],
            "foreign": [("a", self.a), ("other", nn.Linear(8, 8))],
            "twice": [("a", self.a), ("b", self.a)],
            "generator": ((name, m) for name, m in (("a", self.a), ("b", self.b))),
        }[self.returns]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.returns == "view":
            return x.view(3, -1, 7)  # 8 features do not split into 7s: raised here, not in the inputs
        return self.b(torch.tanh(self.a(x)))


def pairs() -> nn.Module:
    return Net("pairs")


def bare() -> nn.Module:
    return Net("bare")


def module() -> nn.Module:
    return Net("module")


def empty() -> nn.Module:
    return Net("empty")


def foreign() -> nn.Module:
    return Net("foreign")


def twice() -> nn.Module:
    return Net("twice")


def generator() -> nn.Module:
    return Net("generator")


class Listed(Net):
    def __init__(self) -> None:
        super().__init__("pairs")
        self.stability_blocks = [("a", self.a), ("b", self.b)]  # type: ignore[assignment,method-assign]


def attribute() -> nn.Module:
    return Listed()


class Plain(Net):
    stability_blocks = None  # type: ignore[assignment]


def view() -> nn.Module:
    return Plain("view")
