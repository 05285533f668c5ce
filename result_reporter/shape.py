"""Hints for a wrong ``results_shape``: a server that answers 2xx to our rows but keeps asking for them, or one
that answers 404 to ``POST ?task=result`` although it answered the ``GET``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from typing import get_args

from services.config import ResultsShape

# The reporter's logger: these lines are part of its log, under the name operators filter on.
log = logging.getLogger("result_reporter.reporter")

ASKED_AGAIN_ROUNDS = 3  # rounds a server may ask again for a final result it accepted before we suspect the shape


def try_other_shapes(shape: ResultsShape) -> str:
    """The fix to name: "try message_result_string or message_result_array (results_shape, SMSGW_RESULTS_SHAPE)"."""
    others = " or ".join(other for other in get_args(ResultsShape) if other != shape)
    return f"try {others} (results_shape, SMSGW_RESULTS_SHAPE)"


def post_404_hint(shape: ResultsShape) -> str:
    """The hint for HTTP 404 to ``POST ?task=result``: the server answered the GET, so it has the Results API
    but found nothing it reads in our body."""
    return f" (it answers GET ?task=result, so it probably reads another body than results_shape {shape}: " + (
        f"{try_other_shapes(shape)})"
    )


def rows_not_understood_hint(shape: ResultsShape, sent_ok_code: int) -> str:
    """The hint for a server that refuses our rows (success:false, HTTP 400/422): the two settings that decide
    what it reads, with the value to try for ``sent_ok_code`` (the docs send 0, the Android app -1)."""
    other = 0 if sent_ok_code == -1 else -1
    return (
        f" (if the server does not understand the rows: try sent_ok_code {other} instead of {sent_ok_code} "
        f"(SMSGW_SENT_OK_CODE), or {try_other_shapes(shape)})"
    )


class ShapeWatch:
    """Warns once when one endpoint keeps asking (``ASKED_AGAIN_ROUNDS`` rounds in a row) for final results it
    accepted: it answered 2xx but did not find the rows in the body, which usually means it reads another
    ``results_shape``.

    While it ``watching`` (final results accepted, the server not yet seen to let go of one), the reporter asks
    the server even in rounds with nothing to report, so a quiet gateway gets the hint too. Once the server stops
    asking for an accepted final result, the shape works: the watch ends for good.
    """

    def __init__(self, endpoint_name: str, shape: ResultsShape) -> None:
        self._name = endpoint_name
        self._shape = shape
        # uuid -> consecutive rounds the server asked again for a final result it had accepted; bounded by the
        # uuids of one ?task=result answer that were reported.
        self._asked_again: dict[str, int] = {}
        self._done = False  # warned, or the server was seen to let go of an accepted final result

    @property
    def watching(self) -> bool:
        """Whether a round with nothing to report should still ask the server what it waits for."""
        return not self._done and bool(self._asked_again)

    def accepted(self, final_uuids: Iterable[str]) -> None:
        """The server accepted the final results of ``final_uuids``: watch whether it still asks for them."""
        if not self._done:
            for uuid in final_uuids:
                self._asked_again.setdefault(uuid, 0)

    def note(self, waited: Collection[str], held: Collection[str], is_final: Callable[[str], bool]) -> None:
        """Count the rounds in a row the server waits for a uuid we do not hold and whose accepted row was final
        (``is_final``); the warning once one reaches ``ASKED_AGAIN_ROUNDS``."""
        if self._done:
            return
        if any(uuid not in waited for uuid in self._asked_again):
            self._done = True  # it let go of a result it accepted: it reads our shape
            self._asked_again.clear()
            return
        final = [uuid for uuid in waited if uuid not in held and is_final(uuid)]
        self._asked_again = {uuid: self._asked_again.get(uuid, 0) + 1 for uuid in final}
        stuck = sorted(uuid for uuid, rounds in self._asked_again.items() if rounds >= ASKED_AGAIN_ROUNDS)
        if not stuck:
            return
        self._done = True
        self._asked_again.clear()
        log.warning(
            "%s: the server still asks for %d final result(s) it accepted %d rounds ago (e.g. %s): it probably "
            "reads another body than results_shape %s; %s. Logged once",
            self._name,
            len(stuck),
            ASKED_AGAIN_ROUNDS,
            stuck[0],
            self._shape,
            try_other_shapes(self._shape),
        )
