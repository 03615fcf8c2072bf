"""How long the fuzzers run: a few dozen examples each in the fast loop, more on request.

``GUARDRAIL_FUZZ_EXAMPLES=2000 make test-fast`` gives every property that many examples
(a longer hunt); unset, each uses the count it names, which keeps ``make test-fast`` quick.
Hypothesis keeps the failing examples it finds in ``.hypothesis/`` and tries them first.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def examples(n: int) -> settings:
    """Hypothesis settings for a property: ``n`` examples (or ``$GUARDRAIL_FUZZ_EXAMPLES``), no deadline
    (a shared CPU makes timings noisy), function-scoped fixtures allowed (they are read-only here)."""
    wanted = os.environ.get("GUARDRAIL_FUZZ_EXAMPLES")
    return settings(max_examples=int(wanted) if wanted else n, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
