<?xml version="1.0" encoding="UTF-8"?>
<!--
  libvirt.xsl: turns the small domain description vmimagemanager builds from a slot's config
  into the domain XML it defines in libvirt (`-u` on a box libvirt does not know yet; see it
  with the print-xml option). A slot may name its own stylesheet with
  `hosttransform`; an admin may also put an edited copy at /etc/vmimagemanager/libvirt.xsl.

  The description looks like this (elements appear only when the slot configures them):

    <domain type="kvm|qemu">
      <name/> <memory unit="KiB"/> <vcpu/>
      <os><type arch="x86_64">hvm</type><kernel/><initrd/><cmdline/></os>
      <devices>
        <disk type="file|block" device="disk"><driver name="qemu" type="raw|qcow2"/>
              <source file|dev="..."/></disk>
        <interface type="bridge"><mac address="..."/><source bridge="..."/></interface>
        <serial type="file"><source path="..."/></serial>
      </devices>
    </domain>

  This stylesheet produces a modern domain: ACPI and APIC (so -d can shut it down), UTC
  clock, virtio disk (vda) and network, the serial console on ttyS0 (logged to the file when
  one is given, else a pty), no graphics. Anything it does not know is copied as it is.
-->
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:output method="xml" indent="yes" omit-xml-declaration="yes"/>

  <xsl:template match="@*|node()">
    <xsl:copy><xsl:apply-templates select="@*|node()"/></xsl:copy>
  </xsl:template>

  <xsl:template match="/domain">
    <domain type="{@type}">
      <xsl:apply-templates select="name|memory|vcpu"/>
      <os>
        <xsl:apply-templates select="os/*"/>
        <xsl:if test="not(os/kernel)"><boot dev="hd"/></xsl:if>
      </os>
      <features><acpi/><apic/></features>
      <clock offset="utc"/>
      <on_poweroff>destroy</on_poweroff>
      <on_reboot>restart</on_reboot>
      <on_crash>destroy</on_crash>
      <devices>
        <xsl:apply-templates select="devices/disk"/>
        <xsl:apply-templates select="devices/interface"/>
        <xsl:choose>
          <xsl:when test="devices/serial">
            <xsl:apply-templates select="devices/serial"/>
          </xsl:when>
          <xsl:otherwise>
            <serial type="pty"><target port="0"/></serial>
          </xsl:otherwise>
        </xsl:choose>
        <xsl:apply-templates select="devices/*[not(self::disk or self::interface or self::serial)]"/>
      </devices>
    </domain>
  </xsl:template>

  <xsl:template match="devices/disk">
    <disk type="{@type}" device="disk">
      <xsl:copy-of select="driver"/>
      <xsl:copy-of select="source"/>
      <target dev="vd{substring('abcdefghijklmnopqrstuvwxyz', position(), 1)}" bus="virtio"/>
    </disk>
  </xsl:template>

  <xsl:template match="devices/interface">
    <interface type="{@type}">
      <xsl:copy-of select="mac"/>
      <xsl:copy-of select="source"/>
      <model type="virtio"/>
    </interface>
  </xsl:template>

  <xsl:template match="devices/serial">
    <serial type="file">
      <xsl:copy-of select="source"/>
      <target port="0"/>
    </serial>
  </xsl:template>
</xsl:stylesheet>
