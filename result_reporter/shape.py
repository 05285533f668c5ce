"""A hint for a wrong ``results_shape``: a server that answers 2xx to our rows but keeps asking for them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import get_args

from services.config import ResultsShape

# The reporter's logger: these lines are part of its log, under the name operators filter on.
log = logging.getLogger("result_reporter.reporter")

ASKED_AGAIN_ROUNDS = 3  # rounds a server may ask again for a final result it accepted before we suspect the shape


class ShapeWatch:
    """Warns once when one endpoint keeps asking (``ASKED_AGAIN_ROUNDS`` rounds in a row) for final results it
    accepted: it answered 2xx but did not find the rows in the body, which usually means it reads another
    ``results_shape``."""

    def __init__(self, endpoint_name: str, shape: ResultsShape) -> None:
        self._name = endpoint_name
        self._shape = shape
        # uuid -> consecutive rounds the server asked again for a final result it had accepted; bounded by the
        # uuids of one ?task=result answer that were reported.
        self._asked_again: dict[str, int] = {}
        self._warned = False

    def note(self, waited: Collection[str], held: Collection[str], is_final: Callable[[str], bool]) -> None:
        """Count the rounds in a row the server waits for a uuid we do not hold and whose accepted row was final
        (``is_final``); the warning once one reaches ``ASKED_AGAIN_ROUNDS``."""
        if self._warned:
            return
        final = [uuid for uuid in waited if uuid not in held and is_final(uuid)]
        self._asked_again = {uuid: self._asked_again.get(uuid, 0) + 1 for uuid in final}
        stuck = sorted(uuid for uuid, rounds in self._asked_again.items() if rounds >= ASKED_AGAIN_ROUNDS)
        if not stuck:
            return
        self._warned = True
        others = " or ".join(other for other in get_args(ResultsShape) if other != self._shape)
        log.warning(
            "%s: the server still asks for %d final result(s) it accepted %d rounds ago (e.g. %s): it probably "
            "reads another body than results_shape %s; try %s (results_shape, SMSGW_RESULTS_SHAPE). Logged once",
            self._name,
            len(stuck),
            ASKED_AGAIN_ROUNDS,
            stuck[0],
            self._shape,
            others,
        )
