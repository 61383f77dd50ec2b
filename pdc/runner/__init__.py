"""Running a spec: the build directory and its stages (`build`), `pdc check` (`check`) and the
run report (`report`)."""
