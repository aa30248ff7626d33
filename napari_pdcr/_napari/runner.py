"""Run / cancel wiring shared by the dock widgets: one napari worker at a time."""

from __future__ import annotations

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_info
from qtpy.QtCore import QTimer

#: Stages of a run in order (``Progress.stage``; "prepare" / "refine" belong to the first / last).
STAGES = {"reach": 1, "prepare": 1, "screen": 2, "coarse screen": 2, "coarse estimate": 2, "estimate": 3, "refine": 3}
#: Shortest time (ms) between two progress-bar updates. QProgressBar.setValue repaints
#: synchronously, through napari's Python event filter of the main window, holding the GIL
#: the worker needs (7.5 ms an update with software OpenGL: 1.3 s of an 8 s run at one
#: update per batch, measured with py-spy --gil); later reports within it are coalesced.
PROGRESS_INTERVAL_MS = 250


def progress_text(progress) -> str:
    """``"stage 2 of 3, screen: 120/450 evaluations · ~40 s left"`` (time left for the whole estimate)."""
    stage = STAGES.get(progress.stage)
    where = f"stage {stage} of 3, {progress.stage}" if stage else progress.stage
    eta = progress.eta_s
    scope = "" if progress.expected_total else " in this stage"
    left = "" if eta is None else f" · ~{eta:.0f} s left{scope}" if eta >= 1 else f" · <1 s left{scope}"
    return f"{where}: {progress.done}/{progress.total} evaluations{left}"


class BackgroundRun:
    """Mixin for a dock widget that runs a progress generator in a napari worker.

    The widget provides ``run_button``, ``cancel_button``, ``progress`` (a QProgressBar
    with range 0-1000), ``worker`` (None when idle), ``settings_panel()`` (the widget
    disabled while running) and the ``_on_returned(result)`` / ``_on_errored(error)``
    slots. A second run (or task) while one is going is refused, not raced; Cancel
    stops the worker at its next yield (within one batch) and nothing is returned.
    """

    def refuse_if_running(self) -> bool:
        """True (and a notification) when a run is already going."""
        if self.worker is not None:
            show_info("A run is already going: wait for it or press Cancel.")
            return True
        return False

    def start_worker(self, function, *args, loading_text: str, on_returned=None) -> None:
        """Run ``function(*args)`` in a worker; its result goes to ``on_returned`` (default ``_on_returned``).

        A generator of ``Progress`` shows its progress and can be cancelled; a plain
        function (a short task such as loading a model to list its parts) cannot.
        """
        worker = create_worker(function, *args, _start_thread=False, _ignore_errors=True)
        cancellable = isinstance(worker, GeneratorWorker)
        if cancellable:
            worker.yielded.connect(self._on_progress)
            worker.aborted.connect(self._on_aborted)
        worker.returned.connect(on_returned or self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._set_running(True)
        self.cancel_button.setEnabled(cancellable)
        self.progress.setValue(0)
        self.progress.setFormat(loading_text)
        worker.start()

    def cancel(self) -> None:
        """Ask the running worker to stop after its current batch."""
        if self.worker is not None:
            self.worker.quit()
            self.cancel_button.setEnabled(False)
            self.progress.setFormat("cancelling after this batch…")

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.settings_panel().setEnabled(not running)

    def _on_progress(self, progress) -> None:
        """Show ``progress`` now, or, within :data:`PROGRESS_INTERVAL_MS` of the last update, when it ends."""
        self._pending_progress = progress
        if not hasattr(self, "_progress_timer"):
            self._progress_timer = QTimer(self)
            self._progress_timer.setSingleShot(True)
            self._progress_timer.setInterval(PROGRESS_INTERVAL_MS)
            self._progress_timer.timeout.connect(self._show_pending_progress)
        if not self._progress_timer.isActive():
            self._show_pending_progress()

    def _show_pending_progress(self) -> None:
        progress, self._pending_progress = self._pending_progress, None
        if progress is None or self.worker is None:  # nothing new, or the run has ended meanwhile
            return
        self.progress.setValue(int(1000 * progress.fraction))
        self.progress.setFormat(progress_text(progress))
        self._progress_timer.start()

    def _on_aborted(self) -> None:
        self.progress.setValue(0)
        self.progress.setFormat("cancelled: no result")

    def _on_finished(self) -> None:
        self.worker = None
        self._set_running(False)
