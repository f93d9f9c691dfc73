from mnist_lit.cli import main

main()
