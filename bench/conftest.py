"""Every comparison in bench/ runs single-threaded, OpenCV included (ratios of one core)."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _single_thread_opencv():
    cv2 = pytest.importorskip("cv2")
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    yield
    cv2.setNumThreads(before)
