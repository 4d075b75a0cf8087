# README.md shows examples/hello.c verbatim, so the C example it teaches is
# the one the suite compiles and runs (example_hello, install).
file(READ ${README} readme)
file(READ ${EXAMPLE} example)
string(FIND "${readme}" "```c\n${example}```\n" at)
if(at EQUAL -1)
  message(FATAL_ERROR "README.md does not show ${EXAMPLE} verbatim in a ```c block: copy it there")
endif()
message("1 passed, 0 failed")
