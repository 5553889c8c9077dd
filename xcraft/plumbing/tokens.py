"""Token layers of transformers, (n, tokens, channels), laid out as spatial maps.

A vision transformer's encoder gives one vector per token: ``n_leading`` leading tokens (a CLS
token; also register or distillation tokens) followed by the patch tokens of a ``grid_height`` ×
``grid_width`` grid in row-major order, so patch token ``t`` sits at row ``t // grid_width`` and
column ``t % grid_width`` of the image. CRAFT then treats the patch tokens as the locations of a
spatial map: crops are pooled over tokens, coefficients are solved per token, maps are drawn on
the grid and upsampled to the image.

The leading tokens have no place in the image. ``cls_token`` says whether they take part in the
pooled activations the NMF learns from (``"keep"``) or not (``"exclude"``, an int count); in
either case they are never drawn in maps, and the head always receives the full token tensor
(the leading tokens rebuilt from their own coefficients, like every position).
"""

import numbers
from dataclasses import dataclass

import xcraft._tensorflow  # noqa: F401  first: TensorFlow's C++ start-up lines held back

# isort: split
import tensorflow as tf

__all__ = ["CLS_TOKEN_OPTIONS", "TokenLayout", "check_token_options", "token_layout"]

CLS_TOKEN_OPTIONS = ("auto", "exclude", "keep")


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of a (n, n_tokens, channels) layer sit.

    Attributes
    ----------
    n_tokens : int
        All tokens, leading ones included.
    n_leading : int
        Tokens before the patch tokens (CLS, registers, distillation).
    grid : tuple of int
        ``(grid_height, grid_width)`` of the patch tokens; their product is
        ``n_tokens - n_leading``.
    keep_leading : bool
        Whether the leading tokens enter the pooled activations (``cls_token="keep"``).
    """

    n_tokens: int
    n_leading: int
    grid: tuple
    keep_leading: bool = False

    @property
    def pooled_start(self):
        """First token of the pooled ones: 0 when the leading tokens are kept."""
        return 0 if self.keep_leading else self.n_leading

    def pooled_tokens(self, activations):
        """The tokens that are averaged into an image's (or crop's) activation vector.

        Parameters
        ----------
        activations : tf.Tensor or ndarray of shape (n, n_tokens, channels)

        Returns
        -------
        same type, of shape (n, n_pooled, channels)
        """
        return activations[:, self.pooled_start:]

    def pool(self, activations):
        """Mean over the pooled tokens: (n, n_tokens, c) -> (n, c), as a tensor."""
        return tf.reduce_mean(self.pooled_tokens(activations), axis=1)

    def to_grid(self, activations):
        """The patch tokens on their grid: (n, n_tokens, c) -> (n, grid_height, grid_width, c).

        Token ``n_leading + t`` goes to ``(t // grid_width, t % grid_width)`` (row-major, the
        order a ``Conv2D`` patch embedding followed by a reshape produces).
        """
        patches = activations[:, self.n_leading:]  # (n, gh gw, c)
        return tf.reshape(patches, (-1, *self.grid, patches.shape[-1]))  # (n, gh, gw, c)


def _square_side(n):
    side = int(round(n ** 0.5))
    return side if side * side == n else None


def check_token_options(cls_token, token_grid):
    """Return ``(cls_token, token_grid)`` checked: an option or int count, and None or a pair.

    Raises
    ------
    TypeError, ValueError
        On a ``cls_token`` that is neither one of ``CLS_TOKEN_OPTIONS`` nor an int >= 0, or a
        ``token_grid`` that is not None or a pair of ints >= 1.
    """
    if isinstance(cls_token, str):
        if cls_token not in CLS_TOKEN_OPTIONS:
            raise ValueError(
                f"`cls_token` must be one of {', '.join(map(repr, CLS_TOKEN_OPTIONS))} or an int "
                f"count of leading tokens, got {cls_token!r}."
            )
    elif isinstance(cls_token, bool) or not isinstance(cls_token, numbers.Integral):
        raise TypeError(
            f"`cls_token` must be one of {', '.join(map(repr, CLS_TOKEN_OPTIONS))} or an int "
            f"count of leading tokens, got {type(cls_token).__name__} {cls_token!r}."
        )
    elif cls_token < 0:
        raise ValueError(f"`cls_token` must be an int count >= 0, got {cls_token}.")
    else:
        cls_token = int(cls_token)
    if token_grid is None:
        return cls_token, None
    if (
        isinstance(token_grid, (str, bytes))
        or not hasattr(token_grid, "__len__")
        or len(token_grid) != 2
        or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in token_grid)
    ):
        raise TypeError(
            f"`token_grid` must be None or a pair (grid_height, grid_width) of ints, got "
            f"{token_grid!r}."
        )
    if min(token_grid) < 1:
        raise ValueError(f"`token_grid` must hold sides >= 1, got {tuple(token_grid)}.")
    return cls_token, (int(token_grid[0]), int(token_grid[1]))


def token_layout(shape, cls_token="auto", token_grid=None):
    """Resolve the layout of a token layer from its activations' shape and the options.

    Parameters
    ----------
    shape : tuple
        The activations' shape (batch, n_tokens, channels).
    cls_token : {"auto", "exclude", "keep"} or int, default="auto"
        ``"auto"``: the leading tokens are what ``token_grid`` leaves over, or without it none
        when ``n_tokens`` is a square and one (a CLS token) when ``n_tokens - 1`` is;
        excluded from the pooling. ``"exclude"``: one CLS token, excluded. ``"keep"``: one
        CLS token, pooled with the patch tokens. An int: that many leading tokens, excluded.
    token_grid : tuple (grid_height, grid_width) or None, default=None
        The patch grid; None takes the square one.

    Returns
    -------
    TokenLayout

    Raises
    ------
    ValueError
        If the patch tokens do not fill the grid (or a square when no grid is given).
    """
    cls_token, token_grid = check_token_options(cls_token, token_grid)
    if len(shape) != 3 or shape[1] is None:
        raise ValueError(
            f"A token layer must give activations of shape (batch, tokens, channels) with a "
            f"known number of tokens, got shape {tuple(shape)}."
        )
    n_tokens = int(shape[1])
    if cls_token == "auto":
        if token_grid is not None:
            n_leading = n_tokens - token_grid[0] * token_grid[1]
            if n_leading < 0:
                raise ValueError(
                    f"`token_grid={token_grid}` holds {token_grid[0] * token_grid[1]} patch "
                    f"tokens, more than the split layer's {n_tokens} tokens. Give the grid of "
                    f"the patch tokens."
                )
        elif _square_side(n_tokens) is not None:
            n_leading = 0
        elif n_tokens > 1 and _square_side(n_tokens - 1) is not None:
            n_leading = 1
        else:
            raise ValueError(
                f"The split layer's {n_tokens} tokens are neither a square grid of patch "
                f"tokens nor one CLS token and a square grid. Pass the number of leading "
                f"(CLS, register, distillation) tokens as `cls_token=` (an int), or the patch "
                f"grid as `token_grid=(height, width)`."
            )
    else:
        n_leading = 1 if cls_token in ("exclude", "keep") else cls_token
    n_patches = n_tokens - n_leading
    if n_patches < 1:
        raise ValueError(
            f"The split layer has {n_tokens} tokens, which leaves no patch token after "
            f"{n_leading} leading token(s) (`cls_token={cls_token!r}`, "
            f"`token_grid={token_grid!r}`). Give fewer leading tokens or a smaller grid."
        )
    if token_grid is None:
        side = _square_side(n_patches)
        if side is None:
            raise ValueError(
                f"The split layer's {n_tokens} tokens minus {n_leading} leading token(s) leave "
                f"{n_patches} patch tokens, which is not a square grid. Pass the grid as "
                f"`token_grid=(height, width)`, or the right number of leading tokens as "
                f"`cls_token=`."
            )
        token_grid = (side, side)
    elif token_grid[0] * token_grid[1] != n_patches:
        raise ValueError(
            f"`token_grid={token_grid}` holds {token_grid[0] * token_grid[1]} patch tokens, but "
            f"the split layer's {n_tokens} tokens minus {n_leading} leading token(s) leave "
            f"{n_patches}. Give the grid of the patch tokens, or the right `cls_token=`."
        )
    return TokenLayout(n_tokens, n_leading, token_grid, keep_leading=cls_token == "keep")
