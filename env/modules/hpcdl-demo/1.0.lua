-- A tiny Lmod module used by the tests: proves site profiles' `modules` really load.
help([[hpcdl demo module: sets HPCDL_DEMO_MODULE and puts a marker on PATH-like variables.]])
whatis("Name: hpcdl-demo")
whatis("Version: 1.0")
setenv("HPCDL_DEMO_MODULE", "1.0")
prepend_path("HPCDL_DEMO_PATH", "/opt/hpcdl-demo/1.0/bin")
