"""DeSync as the commands use it: audio read as av-benchmark reads it (`to_16k`), then scored by
Synchformer's audio branch and sync head. The networks themselves live in shared/models/desync.py;
this is the entry point evaluate (and outside tools) import."""
from shared.models.desync import MIN_DESYNC_SEC, SAMPLE_RATE, to_16k  # noqa: F401
