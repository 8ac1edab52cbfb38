# $1: 0 on erase, 1 on upgrade. On erase, first make sure no login still
# runs the recorder (see packaging/debian/prerm): a non-zero exit stops the
# erase. SHELLTRAIL_FORCE_REMOVE=1 removes anyway. Then stop the services.
if [ "$1" = 0 ] && [ "${SHELLTRAIL_FORCE_REMOVE:-}" != 1 ] && [ -x /usr/bin/shelltrail ]; then
    /usr/bin/shelltrail disable --package-removal || exit 1
fi
if [ "$1" = 0 ]; then
    systemctl disable --now shelltrail-agent.service shelltrail-agent.socket shelltrail-collector.service >/dev/null 2>&1 || :
fi
