# On erase (not on upgrade): the recorder is no longer a shell.
if [ "$1" = 0 ]; then
    sed -i '\#^/usr/bin/shelltrail-shell$#d' /etc/shells
fi
